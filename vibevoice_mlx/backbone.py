"""The Qwen2.5 backbone: mlx-lm's Qwen2 driven by input embeddings, and the two-branch CFG cache.

VibeVoice runs the language model twice per frame: the positive branch (full prompt) and the negative,
unconditional branch (a lone speech_start followed by the generated speech, architecture.md §6.1/§6.4). Both
consume the same input embedding each step, so they run as one batch over a `CFGCache`: one mlx-lm `BatchKVCache`
per layer whose rows are the two branches of every script in the batch, left-padded to the longest. The weights
are then read once per frame, however many scripts run.
"""

from typing import Callable, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models import qwen2
from mlx_lm.models.cache import BatchKVCache, KVCache

from . import invariant
from .activations import SwiGLU

# The mlx-lm parameter names the loader relies on (tests/test_backbone.py pins them).
LAYER_PARAMS = (
    "self_attn.q_proj.weight",
    "self_attn.q_proj.bias",
    "self_attn.k_proj.weight",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.weight",
    "self_attn.v_proj.bias",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
)


def model_args(decoder_config: dict) -> qwen2.ModelArgs:
    """mlx-lm Qwen2 arguments from the normalized `decoder_config`."""
    return qwen2.ModelArgs.from_dict(dict(decoder_config, model_type="qwen2"))


def make_language_model(args: qwen2.ModelArgs) -> qwen2.Qwen2Model:
    """The backbone without its head: embed_tokens, layers, norm (original names under `language_model.`)."""
    return qwen2.Qwen2Model(args)


def forward(lm: qwen2.Qwen2Model, embeds: mx.array, cache) -> mx.array:
    """Final-normed hidden states [B, T, H] for input embeddings [B, T, H], appending to `cache`."""
    return lm(None, cache=cache, input_embeddings=embeds)


def prefill(lm: qwen2.Qwen2Model, embeds: mx.array, cache, chunk_size: int = 512) -> Optional[mx.array]:
    """Run a long prompt through the cache in chunks; returns the hidden state of the last position [B, 1, H]."""
    h = None
    for start in range(0, embeds.shape[1], chunk_size):
        h = forward(lm, embeds[:, start : start + chunk_size], cache)
        mx.eval(h, [(c.keys, c.values) for c in cache])
    return None if h is None else h[:, -1:]


def make_cache(lm: qwen2.Qwen2Model) -> List[KVCache]:
    return [KVCache() for _ in lm.layers]


def _transposed(w: mx.array) -> mx.array:
    """w.T in row-major memory. MLX's strided copy moves ~0.2 GB/s on this path; numpy, 16 rows at a time from a
    view of the same memory, about 5x that (the decode layout of a 1.5B model: ~10 s instead of ~50 s)."""
    if w.dtype == mx.bfloat16 or mx.default_device() != mx.cpu:  # numpy has no bfloat16
        return mx.contiguous(w.T)
    src = np.asarray(w)
    out = np.empty(src.shape[::-1], src.dtype)
    for i in range(0, src.shape[0], 16):
        out[:, i : i + 16] = src[i : i + 16].T
    return mx.array(out)


class DecodeLinear(nn.Module):
    """A Linear with its weight stored transposed, `weight_t` [in, out], made from a loaded `nn.Linear`.

    A decode step multiplies one or two rows by each weight. On MLX's CPU backend (OpenBLAS sgemm) that runs
    1.4 to 1.7x faster against a row-major [in, out] matrix than against the checkpoint's [out, in] one read
    transposed, and the decode path is bound by exactly those reads; on BLIS the two layouts read alike (within
    10 %, either way by shape). Same products, summed in another order:
    results differ by float32 rounding only. A float32 bias beside float16 weights follows the activations.
    `group` > 0 makes it batch-invariant (`invariant.matmul`, set by `invariant.set_group`).
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight_t = _transposed(linear.weight)
        if "bias" in linear:
            self.bias = linear.bias
        self.group = 0

    def __call__(self, x: mx.array) -> mx.array:
        bias = self.bias.astype(x.dtype) if "bias" in self else None
        return invariant.matmul(x, self.weight_t, self.group, bias)


def to_decode_layout(module: nn.Module, keep: Optional[Callable[[str, nn.Linear], bool]] = None) -> int:
    """Replace every float `nn.Linear` under `module` (unless `keep(path, linear)`) by a `DecodeLinear`, one at a
    time, so memory never holds more than one extra matrix; returns how many. Quantized layers stay as they are;
    a language model's MLPs also get the multiply-add SiLU. For the CPU backend only: Metal's kernels are
    written for the checkpoint layout, and its exp is fast."""
    if isinstance(module, qwen2.Qwen2Model):
        for layer in module.layers:  # the MLPs' SiLU as multiply-adds (activations.py)
            layer.mlp = SwiGLU(layer.mlp)
    # Paths only: a list of the old modules would keep every replaced weight alive until the end (on the 1.5B,
    # 5 GB more at the load's peak).
    paths = [path for path, m in module.named_modules() if isinstance(m, nn.Linear) and not (keep and keep(path, m))]
    for path in paths:
        *parents, leaf = path.split(".")
        parent = module
        for name in parents:
            parent = parent[int(name)] if isinstance(parent, list) else getattr(parent, name)
        linear = parent[int(leaf)] if isinstance(parent, list) else getattr(parent, leaf)
        new = DecodeLinear(linear)
        mx.eval(new.parameters())
        if isinstance(parent, list):
            parent[int(leaf)] = new
        else:
            setattr(parent, leaf, new)
        del linear, new
    return len(paths)


class ScriptAttention(nn.Module):
    """mlx-lm's Qwen2 attention (same projections and rope) with one attention product per script when `group` > 0
    (2: a script's CFG pair), over that script's own key window: its rows' keys start where its positive row's do,
    so the left padding that longer batch-mates add never enters its sums (on BLIS and OpenBLAS a row's result
    changes with the number of padded keys before it). What `invariant.set_group` turns on in the language model.
    """

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.rope, self.scale = attn.rope, attn.scale
        self.n_heads, self.n_kv_heads = attn.n_heads, attn.n_kv_heads
        self.group = 0

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        B, L, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = k.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = v.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        g = self.group
        if g <= 0 or B <= g or not isinstance(cache, BatchKVCache):
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        else:
            outs = []
            for i, start in zip(range(0, B, g), np.array(cache.left_padding)[::g].tolist()):
                m = mask[i:i + g, ..., start:] if isinstance(mask, mx.array) else mask
                outs.append(mx.fast.scaled_dot_product_attention(q[i:i + g], k[i:i + g, :, start:],
                                                                 v[i:i + g, :, start:], scale=self.scale, mask=m))
            out = mx.concatenate(outs)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


def batch_invariant(lm: qwen2.Qwen2Model) -> None:
    """Give every layer a `ScriptAttention`; `invariant.set_group(lm, 2)` then makes the whole model per script."""
    for layer in lm.layers:
        if not isinstance(layer.self_attn, ScriptAttention):
            layer.self_attn = ScriptAttention(layer.self_attn)


class CFGCache:
    """The KV caches of every script in a batch, both CFG branches, as one left-padded batch per layer.

    Row 2i is script slot i's positive branch (its prompt, then the generated speech), row 2i+1 its negative one
    (a lone speech_start, then the speech). Each step appends one entry to every row. `drop_negative` undoes a
    negative row's entry on a step that produced no frame (the reference runs the negative branch only on
    diffusion steps); `reset_negative` empties a negative row, which is how the original restarts the
    unconditional branch on every speech_start (positions restart at 0); `add` appends a freshly prefilled
    script and `keep` drops finished ones. This class is the one place that touches mlx-lm's `BatchKVCache`
    beyond its documented use; tests/test_backbone.py pins what it relies on.
    """

    def __init__(self, layers: List[BatchKVCache]):
        self.layers = layers

    @classmethod
    def from_prompt(cls, positive: List[KVCache]) -> "CFGCache":
        """One slot: the positive branch's prefilled caches and an empty negative row."""
        return cls([BatchKVCache.merge([c, KVCache()]) for c in positive])

    def __iter__(self):
        return iter(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    def __len__(self):
        return len(self.layers)

    @property
    def slots(self) -> int:
        return int(self.layers[0].offset.shape[0]) // 2

    def add(self, other: "CFGCache") -> None:
        """Append the slots of `other` (their prompts may be longer or shorter: the shorter side is padded)."""
        for c, o in zip(self.layers, other.layers):
            c.extend(o)

    def keep(self, slots: Sequence[int]) -> None:
        """Keep only these slots, in this order."""
        rows = mx.array([r for s in slots for r in (2 * s, 2 * s + 1)])
        for c in self.layers:
            c.filter(rows)

    def drop_negative(self, slots: Optional[Sequence[int]] = None) -> None:
        """Forget the last entry of these slots' negative rows (all slots if None); it becomes left padding."""
        slots = range(self.slots) if slots is None else slots
        padding = [0] * (2 * self.slots)
        for s in slots:
            padding[2 * s + 1] = 1
        for c in self.layers:
            c.prepare(right_padding=padding)
            c.finalize()

    def drop_last(self) -> None:
        """Forget the last entry of every row: undoes a queued step that has to be redone."""
        for c in self.layers:
            c.trim(1)

    def reset_negative(self, slots: Optional[Sequence[int]] = None) -> None:
        """Empty these slots' negative rows: their next token sits at position 0 and sees nothing before it."""
        slots = range(self.slots) if slots is None else slots
        rows = [2 * s + 1 for s in slots]
        for c in self.layers:
            keys, values, offset, left_padding, idx = c.state
            offset, left_padding = np.array(offset), np.array(left_padding)
            offset[rows], left_padding[rows] = 0, idx
            c.state = (keys, values, mx.array(offset), mx.array(left_padding), idx)
