"""The σ-VAE tokenizers: acoustic encoder and decoder, semantic encoder (architecture.md §3.3).

Fully causal ConvNeXt-style 1-D nets, channels-last [B, T, C]. Attribute names follow the original Microsoft
checkpoint (`downsample_layers.0.0.conv.conv.weight`, `stages.S.B.mixer.conv.conv.conv.weight`,
`upsample_layers.N.0.convtr.convtr.weight`, `head.conv.conv.weight`), so `load_weights(strict=True)` takes the
original keys after the conv transposes of `keys.mlx_transpose`.

Every encoder and decoder has a one-shot call and a streaming `stream(x, state) -> (y, state)` with the state as
a flat list of arrays (one per causal conv, in call order); `make_state(batch)` is a fresh stream (a reset).

Dtypes (architecture.md §8): activations follow the dtype of the conv and linear weights; norm statistics are
float32 (`mx.fast.rms_norm`); layer scales, norm weights and biases may stay float32 beside float16 weights
without promoting the activations. Inputs are cast to the weight dtype; latents and audio come out float32.
"""

import logging
import math
from dataclasses import dataclass
from typing import Iterator, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs

from .activations import gelu
from .conv import CausalConv1d, CausalConvTranspose1d

logger = logging.getLogger(__name__)


@dataclass
class TokenizerConfig(BaseModelArgs):  # from_dict ignores unknown keys
    """One tokenizer's config, in the normalized (original) field names of `checkpoint.normalize_config`."""

    vae_dim: int
    channels: int = 1
    encoder_n_filters: int = 32
    decoder_n_filters: int = 32
    encoder_ratios: List[int] = None  # original order; the encoder applies them reversed
    decoder_ratios: Optional[List[int]] = None
    encoder_depths: str = "3-3-3-3-3-3-8"
    decoder_depths: Optional[str] = None  # None: the reversed encoder depths
    kernel_size: int = 7
    last_kernel_size: int = 7
    ffn_expansion: int = 4
    layernorm_eps: float = 1e-5
    fix_std: float = 0.0
    std_dist_type: str = "none"

    def __post_init__(self):
        if self.encoder_ratios is None:
            self.encoder_ratios = [8, 5, 5, 4, 2, 2]
        self.encoder_ratios = [int(r) for r in self.encoder_ratios]
        self.decoder_ratios = [int(r) for r in (self.decoder_ratios or self.encoder_ratios)]
        if self.decoder_depths is None:
            self.decoder_depths = "-".join(reversed(_depth_str(self.encoder_depths).split("-")))
        self.encoder_depths = _depth_str(self.encoder_depths)
        self.decoder_depths = _depth_str(self.decoder_depths)
        if len(self.encoder_depth_list) != len(self.encoder_ratios) + 1:
            raise ValueError("encoder_depths needs one entry more than encoder_ratios.")

    @property
    def hop_length(self) -> int:
        """Audio samples per latent frame (3200 for the released models)."""
        return math.prod(self.encoder_ratios)

    @property
    def encoder_depth_list(self) -> List[int]:
        return [int(d) for d in self.encoder_depths.split("-")]

    @property
    def decoder_depth_list(self) -> List[int]:
        return [int(d) for d in self.decoder_depths.split("-")]


def _depth_str(depths) -> str:
    return depths if isinstance(depths, str) else "-".join(str(int(d)) for d in depths)


class ConvRMSNorm(nn.RMSNorm):
    """RMSNorm over channels with float32 statistics; a float32 weight does not promote the activations."""

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight.astype(x.dtype), self.eps)


class Linear(nn.Linear):
    """nn.Linear whose (possibly float32) bias follows the activation dtype instead of promoting it."""

    def __call__(self, x: mx.array) -> mx.array:
        return mx.addmm(self.bias.astype(x.dtype), x, self.weight.T)


class FFN(nn.Module):
    def __init__(self, dim: int, expansion: int):
        super().__init__()
        self.linear1 = Linear(dim, expansion * dim)
        self.linear2 = Linear(expansion * dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear2(gelu(self.linear1(x)))


class ConvLayer(nn.Module):
    """The original `Convlayer` around the depthwise mixer (its conv lives at `mixer.conv.conv.conv`)."""

    def __init__(self, dim: int, kernel_size: int):
        super().__init__()
        self.conv = CausalConv1d(dim, dim, kernel_size, groups=dim)


class Block1D(nn.Module):
    """ConvNeXt-style block: x + gamma * mixer(norm(x)), then x + ffn_gamma * ffn(ffn_norm(x))."""

    def __init__(self, dim: int, kernel_size: int, ffn_expansion: int, eps: float):
        super().__init__()
        self.norm = ConvRMSNorm(dim, eps=eps)
        self.mixer = ConvLayer(dim, kernel_size)
        self.gamma = mx.full((dim,), 1e-6)
        self.ffn_norm = ConvRMSNorm(dim, eps=eps)
        self.ffn = FFN(dim, ffn_expansion)
        self.ffn_gamma = mx.full((dim,), 1e-6)

    def step(self, x: mx.array, state: mx.array):
        """Streaming step; with a zero state it is the one-shot block (the mixer has stride 1, no right pad)."""
        h, state = self.mixer.conv.step(self.norm(x), state)
        # Layer scales are multiplied before casting back, so float32 scales below float16's normal range
        # (init 1e-6) still act at full precision (architecture.md §8).
        x = x + (h * self.gamma).astype(x.dtype)
        x = x + (self.ffn(self.ffn_norm(x)) * self.ffn_gamma).astype(x.dtype)
        return x, state

    def make_state(self, batch: int, dtype) -> mx.array:
        return self.mixer.conv.make_state(batch, dtype)

    def __call__(self, x: mx.array) -> mx.array:
        return self.step(x, self.make_state(x.shape[0], x.dtype))[0]


def _stage(dim: int, depth: int, cfg: TokenizerConfig) -> List[Block1D]:
    return [Block1D(dim, cfg.kernel_size, cfg.ffn_expansion, cfg.layernorm_eps) for _ in range(depth)]


class _Streaming(nn.Module):
    """Shared streaming plumbing: `self._layers()` lists the (resampling conv list, stage) pairs in order."""

    def _layers(self):
        raise NotImplementedError

    @property
    def dtype(self):
        """The activation dtype: that of the stem conv weight."""
        return self._layers()[0][0][0].conv.conv.weight.dtype

    def make_state(self, batch: int = 1) -> List[mx.array]:
        """A fresh (zero) streaming state for `batch` streams; passing it again is a reset."""
        state = []
        for convs, stage in self._layers():
            state += [c.make_state(batch, self.dtype) for c in convs]
            state += [b.make_state(batch, self.dtype) for b in stage]
        return state + [self.head.make_state(batch, self.dtype)]

    @staticmethod
    def reset_rows(state: List[mx.array], rows: mx.array) -> List[mx.array]:
        """Zero the state of the batch rows where `rows` [B] is True: the original's per-sample reset on
        speech_end (a batch of one simply takes `make_state`)."""
        return [mx.where(rows[:, None, None], mx.zeros_like(s), s) for s in state]

    def _run(self, x: mx.array, state: Optional[List[mx.array]], final: bool = False):
        """One-shot (state None) or streaming pass through resampling convs, stages and head; `final` ends a
        stream with the one-shot right padding (see `CausalConv1d.step`)."""
        x = x.astype(self.dtype)
        new = []
        it = iter(state) if state is not None else None
        for convs, stage in self._layers():
            for conv in convs:
                if it is None:
                    x = conv(x)
                else:
                    x, s = conv.step(x, next(it), final=True) if final else conv.step(x, next(it))
                    new.append(s)
            for block in stage:
                if it is None:
                    x = block(x)
                else:
                    x, s = block.step(x, next(it))
                    new.append(s)
        if it is None:
            return self.head(x).astype(mx.float32), None
        x, s = self.head.step(x, next(it))
        return x.astype(mx.float32), new + [s]


class TokenizerEncoder(_Streaming):
    """σ-VAE encoder: audio [B, L, channels] -> mean [B, ceil(L / hop), vae_dim] (architecture.md §3.3.2)."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        n, ratios = cfg.encoder_n_filters, list(reversed(cfg.encoder_ratios))
        self.hop_length = cfg.hop_length
        self.downsample_layers = [[CausalConv1d(cfg.channels, n, cfg.kernel_size)]] + [
            [CausalConv1d(n * 2**i, n * 2 ** (i + 1), 2 * r, stride=r)] for i, r in enumerate(ratios)
        ]
        self.stages = [_stage(n * 2**i, d, cfg) for i, d in enumerate(cfg.encoder_depth_list)]
        # disable_last_norm: no norm before the head.
        self.head = CausalConv1d(n * 2 ** len(ratios), cfg.vae_dim, cfg.last_kernel_size)
        object.__setattr__(self, "_compiled_runs", {})  # a cache of compiled passes, not a parameter

    def _layers(self):
        return list(zip(self.downsample_layers, self.stages))

    def __call__(self, x: mx.array, chunk_frames: Optional[int] = 16, compile: bool = False) -> mx.array:
        """Encode with the original one-shot padding: the last partial frame is zero-padded.

        Inputs longer than `chunk_frames` frames go through the streaming path in chunks, which gives the same
        result (the convs are causal frame by frame) with bounded memory: a 30 s voice at full size, float32,
        peaks 0.24 GB above the weights in chunks of 16 frames against 1.94 GB in one pass. `None`: one pass.
        `compile=True` runs each chunk through mx.compile, which fuses its elementwise ops (~30 % faster on the
        CPU; traced once per chunk length).
        """
        out = list(self.chunks(x, chunk_frames, compile))
        return out[0] if len(out) == 1 else mx.concatenate(out, axis=1)

    def chunks(self, x: mx.array, chunk_frames: Optional[int] = 16, compile: bool = False) -> Iterator[mx.array]:
        """`__call__` piece by piece: the means of each chunk in turn, evaluated but the last, so that a caller can
        do other work between chunks (the server generates speech while it encodes an upload)."""
        hop = self.hop_length
        run = self._compiled if compile else self._run
        if chunk_frames is None or x.shape[1] <= chunk_frames * hop:
            yield run(x, None)[0]
            return
        state = self.make_state(x.shape[0])
        full = x.shape[1] // hop * hop
        for start in range(0, full, chunk_frames * hop):
            y, state = run(x[:, start : min(start + chunk_frames * hop, full)], state)
            mx.eval(y, state)
            yield y
        if full < x.shape[1]:
            yield run(x[:, full:], state, final=True)[0]

    def _compiled(self, x: mx.array, state: Optional[List[mx.array]], final: bool = False):
        key = (state is None, final)
        if key not in self._compiled_runs:
            one_shot = state is None
            fn = (lambda a: self._run(a, None)) if one_shot else (lambda a, s: self._run(a, s, final=final))
            self._compiled_runs[key] = mx.compile(fn, inputs=self.state)  # reads the weights at every call
        fn = self._compiled_runs[key]
        return fn(x) if state is None else fn(x, state)

    def stream(self, x: mx.array, state: List[mx.array]):
        """Encode the next chunk `x` [B, L, channels], L a multiple of the hop -> (mean [B, L / hop, D], state)."""
        if x.shape[1] % self.hop_length:
            raise ValueError(f"stream chunks must be a multiple of {self.hop_length} samples, got {x.shape[1]}.")
        return self._run(x, state)


class TokenizerDecoder(_Streaming):
    """σ-VAE decoder: latents [B, T, vae_dim] -> audio [B, T * hop, channels] (architecture.md §3.3.3)."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        n, ratios = cfg.decoder_n_filters, cfg.decoder_ratios
        top = len(ratios)
        self.hop_length = math.prod(ratios)
        self.upsample_layers = [[CausalConv1d(cfg.vae_dim, n * 2**top, cfg.kernel_size)]] + [
            [CausalConvTranspose1d(n * 2 ** (top - i), n * 2 ** (top - i - 1), 2 * r, stride=r)]
            for i, r in enumerate(ratios)
        ]
        self.stages = [_stage(n * 2 ** (top - i), d, cfg) for i, d in enumerate(cfg.decoder_depth_list)]
        # No output activation: the waveform may exceed ±1 (architecture.md §3.3.3).
        self.head = CausalConv1d(n, cfg.channels, cfg.last_kernel_size)

    def _layers(self):
        return list(zip(self.upsample_layers, self.stages))

    def __call__(self, z: mx.array) -> mx.array:
        """One-shot decode of `z` [B, T, vae_dim] (always time-major; no layout guessing)."""
        return self._run(z, None)[0]

    def stream(self, z: mx.array, state: List[mx.array]):
        """Decode the next `z` [B, T, vae_dim] (usually T = 1) -> (audio [B, T * hop, channels], state)."""
        return self._run(z, state)


class AcousticTokenizer(nn.Module):
    """The acoustic σ-VAE (`model.acoustic_tokenizer`): `.encoder` for voice prompts, `.decoder` per frame."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.config = cfg
        self.encoder = TokenizerEncoder(cfg)
        self.decoder = TokenizerDecoder(cfg)

    @property
    def vae_std(self) -> float:
        """Scale of the per-item noise std of σ-VAE sampling: fix_std / 0.8 (architecture.md §3.3.5)."""
        return self.config.fix_std / 0.8 if self.config.std_dist_type == "gaussian" else 0.0

    def sample(self, mean: mx.array, std_noise: mx.array, noise: mx.array) -> mx.array:
        """σ-VAE sampling with injected noise: mean + vae_std * std_noise[b] * noise, both drawn from N(0, 1).

        `std_noise` [B] and `noise` (shaped like `mean`) are arguments so that tests can inject the reference's.
        """
        return mean + (self.vae_std * std_noise)[:, None, None] * noise


class SemanticTokenizer(nn.Module):
    """The semantic encoder (`model.semantic_tokenizer`): deterministic, encoder only; streamed per frame."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.config = cfg
        self.encoder = TokenizerEncoder(cfg)
