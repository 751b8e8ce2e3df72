"""Causal Conv1d and ConvTranspose1d for the σ-VAE tokenizers: one-shot calls and streaming steps.

Activations are channels-last, [B, T, C]. Weights keep the MLX layout the converter writes (architecture.md §4.5):
Conv1d [out, k, in/groups], ConvTranspose1d [out, k, in]. The attribute paths mirror the original
`SConv1d.conv.conv` / `SConvTranspose1d.convtr.convtr`, so parameters load under the original checkpoint keys.

Streaming steps are pure functions of (x, state) -> (y, new_state) with the layer's weights as the only other
input, so a caller can `mx.compile` a whole frame step. A fresh zero state (`make_state`) is a reset: zero inputs
are exactly what the causal padding of a one-shot call feeds the first output.

Both convolutions are written as one matmul over gathered taps instead of `mx.conv1d` / `mx.conv_transpose1d`:
on the CPU backend that measured 1.5-2x (strided conv) and 4-5x (transposed conv) faster at the tokenizer's
sizes, and it is a plain GEMM on every backend. The depthwise mixer is 7 shifted multiply-adds (2-3x faster than
a grouped `mx.conv1d` here; fused into one kernel under `mx.compile`).
"""

import math

import mlx.core as mx
import mlx.nn as nn

from . import invariant


def _taps(x: mx.array, kernel_size: int, stride: int, dilation: int, n: int):
    """The k input slices [B, n, C] that tap j of a (strided, dilated) convolution reads."""
    last = (n - 1) * stride + 1
    return [x[:, j * dilation : j * dilation + last : stride] for j in range(kernel_size)]


class NormConv1d(nn.Module):
    """The original's conv wrapper (conv_norm "none"): only `.conv` holds weights; kept for the key names."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 dilation: int = 1, groups: int = 1, bias: bool = True):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride, dilation=dilation,
                              groups=groups, bias=bias)


class NormConvTranspose1d(nn.Module):
    """The original's transposed-conv wrapper: only `.convtr` holds weights; kept for the key names."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, bias: bool = True):
        super().__init__()
        self.convtr = nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride=stride, bias=bias)


class CausalConv1d(nn.Module):
    """Causal Conv1d (the original `SConv1d` with causal=True, pad_mode constant).

    Left padding is `(k - 1) * d - (s - 1)` zeros. The one-shot call also pads zeros on the right so that the
    output has `ceil(L / s)` steps, as the original non-streaming code does (architecture.md §3.3.1); the
    streaming step keeps the last `pad_left` inputs instead and adds no right padding.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 dilation: int = 1, groups: int = 1, bias: bool = True):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.dilation = dilation
        self.groups = groups
        self.pad_left = (kernel_size - 1) * dilation - (stride - 1)
        if self.pad_left < 0:
            raise ValueError(f"kernel_size={kernel_size}, stride={stride}, dilation={dilation}: negative padding.")
        self.conv = NormConv1d(in_channels, out_channels, kernel_size, stride, dilation, groups, bias)
        self.group = 0  # > 0: one product per script (invariant.matmul)

    def _conv(self, x: mx.array) -> mx.array:
        """The convolution of an already padded input ("valid" positions only)."""
        conv = self.conv.conv
        k, s, d = self.kernel_size, self.stride, self.dilation
        n = (x.shape[1] - (k - 1) * d - 1) // s + 1
        w = conv.weight
        if self.groups == 1:
            # im2col: taps concatenated in (k, in) order match the weight's [out, k, in] layout.
            cols = mx.concatenate(_taps(x, k, s, d, n), axis=-1)
            y = invariant.matmul(cols, w.reshape(w.shape[0], -1).T, self.group)
        elif self.groups == self.in_channels == self.out_channels:
            taps = _taps(x, k, s, d, n)
            y = taps[0] * w[:, 0, 0]
            for j in range(1, k):
                y = y + taps[j] * w[:, j, 0]
        else:
            y = mx.conv1d(x, w, stride=s, dilation=d, groups=self.groups)
        if "bias" in conv:
            # A float32 bias beside float16 weights must not promote the activations (architecture.md §8).
            y = y + conv.bias.astype(y.dtype)
        return y

    def extra_padding(self, length: int) -> int:
        """Right zero padding of the original one-shot rule, making the output `ceil(length / stride)` long."""
        k, s = (self.kernel_size - 1) * self.dilation + 1, self.stride
        n_frames = (length - k + self.pad_left) / s + 1
        ideal = (math.ceil(n_frames) - 1) * s + (k - self.pad_left)
        return max(ideal - length, 0)

    def __call__(self, x: mx.array) -> mx.array:
        """One-shot causal convolution of `x` [B, L, C_in] -> [B, ceil(L / stride), C_out]."""
        x = mx.pad(x, [(0, 0), (self.pad_left, self.extra_padding(x.shape[1])), (0, 0)])
        return self._conv(x)

    def make_state(self, batch: int, dtype=mx.float32) -> mx.array:
        """Zero streaming state: the last `pad_left` inputs, [B, pad_left, C_in]."""
        return mx.zeros((batch, self.pad_left, self.in_channels), dtype=dtype)

    def step(self, x: mx.array, state: mx.array, final: bool = False):
        """Streaming step: `x` [B, T, C_in] with T a multiple of the stride -> (y [B, T / stride, C_out], state).

        `final=True` ends the stream as the one-shot call ends the input: zeros pad T up to a multiple of the
        stride, so a last partial frame comes out as in the original (`extra_padding` depends on L mod s only).
        """
        if final and x.shape[1] % self.stride:
            x = mx.pad(x, [(0, 0), (0, -x.shape[1] % self.stride), (0, 0)])
        x = mx.concatenate([state, x], axis=1)
        return self._conv(x), x[:, x.shape[1] - self.pad_left :]


class CausalConvTranspose1d(nn.Module):
    """Causal ConvTranspose1d (the original `SConvTranspose1d`, causal, trim_right_ratio 1).

    The full transposed convolution gives `(L - 1) * s + k` samples; the causal version trims `k - s` on the
    right only, giving `L * s`. Streaming keeps the `k - s` samples that spill past the chunk (without bias) and
    adds them to the next chunk's first samples (overlap-add): the minimal state, and no recomputation.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, bias: bool = True):
        super().__init__()
        if kernel_size % stride:
            raise ValueError(f"kernel_size {kernel_size} must be a multiple of the stride {stride}.")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.trim = kernel_size - stride
        self.convtr = NormConvTranspose1d(in_channels, out_channels, kernel_size, stride, bias)
        self.group = 0  # > 0: one product per script (invariant.matmul)

    def _overlap_add(self, x: mx.array, tail=None):
        """All `L * s + trim` output samples of `x` [B, L, C_in] (no bias), with `tail` added at the start."""
        w = self.convtr.convtr.weight  # [out, k, in]
        out, k, s = w.shape[0], self.kernel_size, self.stride
        b, length = x.shape[0], x.shape[1]
        # Each input step contributes k samples: [B, L, out, k] -> [B, L, k, out].
        y = invariant.matmul(x, w.reshape(out * k, -1).T, self.group).reshape(b, length, out, k).transpose(0, 1, 3, 2)
        total = length * s + self.trim
        z = None
        for j in range(k // s):
            part = y[:, :, j * s : (j + 1) * s].reshape(b, length * s, out)
            part = mx.pad(part, [(0, 0), (j * s, total - length * s - j * s), (0, 0)])
            z = part if z is None else z + part
        if tail is not None and self.trim:
            z = z + mx.pad(tail, [(0, 0), (0, length * s), (0, 0)])
        return z

    def _finish(self, z: mx.array) -> mx.array:
        conv = self.convtr.convtr
        return z + conv.bias.astype(z.dtype) if "bias" in conv else z

    def __call__(self, x: mx.array) -> mx.array:
        """One-shot causal transposed convolution of `x` [B, L, C_in] -> [B, L * stride, C_out]."""
        n = x.shape[1] * self.stride
        return self._finish(self._overlap_add(x)[:, :n])

    def make_state(self, batch: int, dtype=mx.float32) -> mx.array:
        """Zero streaming state: the overlap-add tail, [B, kernel_size - stride, C_out]."""
        return mx.zeros((batch, self.trim, self.out_channels), dtype=dtype)

    def step(self, x: mx.array, state: mx.array):
        """Streaming step: `x` [B, T, C_in] -> (y [B, T * stride, C_out], state); equals the one-shot call."""
        n = x.shape[1] * self.stride
        z = self._overlap_add(x, state)
        return self._finish(z[:, :n]), z[:, n:]
