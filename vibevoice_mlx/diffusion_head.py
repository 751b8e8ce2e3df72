"""VibeVoice diffusion head: a DiT-like MLP stack that predicts v for one acoustic latent frame (spec §3.4).

Attribute names follow the original checkpoint under `model.prediction_head.`, so its weights load unchanged.
"""

import logging
import math
from dataclasses import dataclass
from typing import List

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs
import numpy as np

from .activations import silu

logger = logging.getLogger(__name__)

MAX_PERIOD = 10000  # a code constant in both references, not a config field


@dataclass
class DiffusionHeadConfig(BaseModelArgs):  # from_dict ignores unknown keys
    hidden_size: int = 1536
    latent_size: int = 64
    head_layers: int = 4
    head_ffn_ratio: float = 3.0
    rms_norm_eps: float = 1e-5
    frequency_embedding_size: int = 256

    @property
    def ffn_dim(self) -> int:
        # int() truncation as in the original head (3.0 * 1536 = 4608).
        return int(self.hidden_size * self.head_ffn_ratio)


def timestep_sinusoid(t, dim: int = 256) -> mx.array:
    """Timesteps [N] (exact integers; array or sequence) -> [N, dim] float32 `[cos(t f), sin(t f)]`, cos first.

    Computed on the host: it is a constant per timestep list, and float32 cos/sin of arguments up to 999 rad
    are not accurate on every backend (MLX CPU: 6e-5 off). The frequencies and the product t * f are rounded to
    float32 as the references do; cos/sin of that argument are then evaluated accurately.
    """
    half = dim // 2
    exponent = np.float32(-math.log(MAX_PERIOD)) * np.arange(half, dtype=np.float32) / np.float32(half)
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
    args = (np.asarray(t, dtype=np.float32).reshape(-1, 1) * freqs[None]).astype(np.float64)
    return mx.array(np.concatenate([np.cos(args), np.sin(args)], axis=-1).astype(np.float32))


def _compute_dtype(linear: nn.Module) -> mx.Dtype:
    # A quantized layer keeps uint32 weights; its scales carry the activation dtype. A `DecodeLinear`
    # (backbone.py) holds its weight transposed.
    if "scales" in linear:
        return linear.scales.dtype
    return linear["weight_t" if "weight_t" in linear else "weight"].dtype


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        # A list, not Sequential, so the keys are mlp.0 / mlp.2 as in the checkpoint.
        self.mlp = [
            nn.Linear(frequency_embedding_size, hidden_size, bias=False),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=False),
        ]

    def __call__(self, t) -> mx.array:
        # The sinusoid is cast to the weights' dtype only after it is computed in fp32.
        x = timestep_sinusoid(t, self.frequency_embedding_size).astype(_compute_dtype(self.mlp[0]))
        for layer in self.mlp:
            x = layer(x)
        return x


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(silu(self.gate_proj(x)) * self.up_proj(x))


class HeadLayer(nn.Module):
    """x + gate * FFN(RMSNorm(x) * (1 + scale) + shift), with (shift, scale, gate) from the condition."""

    def __init__(self, cfg: DiffusionHeadConfig):
        super().__init__()
        self.ffn = FeedForward(cfg.hidden_size, cfg.ffn_dim)
        # nn.RMSNorm calls mx.fast.rms_norm, whose statistics are fp32 even for fp16 inputs.
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.adaLN_modulation = [nn.SiLU(), nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=False)]

    def modulate(self, x: mx.array, modulation: mx.array) -> mx.array:
        shift, scale, gate = mx.split(modulation, 3, axis=-1)
        return x + gate * self.ffn(self.norm(x) * (1 + scale) + shift)

    def __call__(self, x: mx.array, c: mx.array) -> mx.array:
        return self.modulate(x, self.adaLN_modulation[1](silu(c)))  # adaLN_modulation.0 is the SiLU


class FinalLayer(nn.Module):
    def __init__(self, cfg: DiffusionHeadConfig):
        super().__init__()
        self.eps = cfg.rms_norm_eps
        self.adaLN_modulation = [nn.SiLU(), nn.Linear(cfg.hidden_size, 2 * cfg.hidden_size, bias=False)]
        self.linear = nn.Linear(cfg.hidden_size, cfg.latent_size, bias=False)

    def modulate(self, x: mx.array, modulation: mx.array) -> mx.array:
        shift, scale = mx.split(modulation, 2, axis=-1)
        # The final norm has no weight in the checkpoint.
        return self.linear(mx.fast.rms_norm(x, None, self.eps) * (1 + scale) + shift)

    def __call__(self, x: mx.array, c: mx.array) -> mx.array:
        return self.modulate(x, self.adaLN_modulation[1](silu(c)))  # adaLN_modulation.0 is the SiLU


class DiffusionHead(nn.Module):
    """Predicts v for noisy latents `x [N, latent]` at timesteps `t [N]` given LM hidden states `[N, H]`.

    Besides the plain `__call__`, it offers the split used by the sampler (architecture.md §9.3-3):
    `modulations` computes every step's adaLN outputs at once for a fixed timestep list, and `predict` runs
    only the FFNs and the final linear for one step.
    """

    def __init__(self, cfg: DiffusionHeadConfig):
        super().__init__()
        self.cfg = cfg
        self.noisy_images_proj = nn.Linear(cfg.latent_size, cfg.hidden_size, bias=False)
        self.cond_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.t_embedder = TimestepEmbedder(cfg.hidden_size, cfg.frequency_embedding_size)
        self.layers = [HeadLayer(cfg) for _ in range(cfg.head_layers)]
        self.final_layer = FinalLayer(cfg)

    @property
    def dtype(self) -> mx.Dtype:
        """The compute dtype: the weights' dtype (the scales' for a quantized layer)."""
        return _compute_dtype(self.cond_proj)

    def __call__(self, x: mx.array, t: mx.array, condition: mx.array) -> mx.array:
        """Reference forward: x [N, latent], t [N] (exact integer timesteps), condition [N, H] -> v [N, latent].

        v comes out in the weights' dtype; callers that combine or integrate it cast it to float32. t is read on
        the host (see `timestep_sinusoid`), so this call is not for `mx.compile`; the per-step `predict` is.
        """
        dtype = self.dtype
        h = self.noisy_images_proj(x.astype(dtype))
        c = self.cond_proj(condition.astype(dtype)) + self.t_embedder(t)
        for layer in self.layers:
            h = layer(h, c)
        return self.final_layer(h, c)

    def modulations(self, condition: mx.array, t_embeddings: mx.array) -> List[mx.array]:
        """adaLN outputs of every layer for every step: condition [B, R, H] (a script's R = 2 CFG branches side by
        side) -> per layer [B, n, R, 3H] (final: 2H), so one script's rows stay together, in (step, branch) order.

        `t_embeddings` [n, H] are `t_embedder(timesteps)` of the schedule (a constant per step count). cond_proj
        runs once, and each adaLN weight is read once for all n steps instead of once per step.
        """
        c = self.cond_proj(condition.astype(self.dtype))[:, None] + t_embeddings[None, :, None]
        c = silu(c)
        mods = [layer.adaLN_modulation[1](c) for layer in self.layers]
        return mods + [self.final_layer.adaLN_modulation[1](c)]

    def predict(self, x: mx.array, modulations: List[mx.array]) -> mx.array:
        """One step from precomputed modulations (one [B, R, kH] array per layer, final last) -> v [B, R, latent]
        for x [B, R, latent]."""
        h = self.noisy_images_proj(x.astype(self.dtype))
        for layer, m in zip(self.layers, modulations):
            h = layer.modulate(h, m)
        return self.final_layer.modulate(h, modulations[-1])
