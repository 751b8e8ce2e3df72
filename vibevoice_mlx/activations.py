"""GELU and SiLU from rational approximations: multiply-adds that mx.compile fuses, accurate to float32 rounding.

MLX's CPU backend evaluates erf, exp and tanh with a scalar library call per element (20 to 45 ns each here),
and a frame applies them to ~10 M values (the tokenizers' GELUs, the language model's and diffusion head's
SiLUs), a prompt to ~60 M. The float32 rational forms XLA and Eigen use for erf and tanh cost a few ns instead.
Their results differ from the library's by float32 rounding (an ulp or two of the larger values), which the
parity tests bound like any other rounding.
"""

import mlx.core as mx
import mlx.nn as nn

# erf(x) = x P(x²) / Q(x²) on [-4, 4], ±1 beyond in float32; max error 4.2e-7 (mx.erf: 4.5e-7).
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
          -1.42647390514189e-02)
# tanh(x) = x P(x²) / Q(x²) on [-7.905, 7.905], ±1 beyond in float32.
_TANH_P = (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08,
           1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03)
_TANH_Q = (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03)


def _rational(x: mx.array, p, q) -> mx.array:
    x2 = x * x
    num, den = p[0], q[0]
    for c in p[1:]:
        num = num * x2 + c
    for c in q[1:]:
        den = den * x2 + c
    return x * num / den


def erf(x: mx.array) -> mx.array:
    """The error function of a float32 array."""
    return _rational(mx.clip(x, -4.0, 4.0), _ERF_P, _ERF_Q)


def tanh(x: mx.array) -> mx.array:
    """tanh of a float32 array."""
    return _rational(mx.clip(x, -7.90531110763549805, 7.90531110763549805), _TANH_P, _TANH_Q)


def gelu(x: mx.array) -> mx.array:
    """The exact (erf) GELU of the original's nn.GELU(), in float32: within 1.2e-6 of float64 for |x| < 12 (values
    up to ~5; nn.gelu: 4.7e-7)."""
    y = x.astype(mx.float32)
    return (y * (1 + erf(y * 0.7071067811865476)) * 0.5).astype(x.dtype)


def silu(x: mx.array) -> mx.array:
    """x * sigmoid(x), the sigmoid as 0.5 + 0.5 tanh(x / 2), in float32: within 2.7e-6 of float64 for |x| < 30
    (values up to ~12; nn.silu: 1.4e-6)."""
    y = x.astype(mx.float32)
    return (y * (0.5 + 0.5 * tanh(0.5 * y))).astype(x.dtype)


class SwiGLU(nn.Module):
    """mlx-lm's Qwen2 MLP (gate_proj, up_proj, down_proj) with `silu` above: what `backbone.to_decode_layout`
    puts in place of each layer's MLP on the CPU, keeping its linears."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(silu(self.gate_proj(x)) * self.up_proj(x))
