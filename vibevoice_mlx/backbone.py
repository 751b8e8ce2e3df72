"""The Qwen2.5 backbone: mlx-lm's Qwen2 driven by input embeddings, and the two-branch CFG cache.

VibeVoice runs the language model twice per frame: the positive branch (full prompt) and the negative,
unconditional branch (a lone speech_start followed by the generated speech, architecture.md §6.1/§6.4). Both
consume the same input embedding each step, so they run as one batch of two over a `CFGCache`: one mlx-lm
`BatchKVCache` whose negative row is left-padded to the positive length. The weights are then read once per frame.
"""

from typing import List, Optional

import mlx.core as mx
from mlx_lm.models import qwen2
from mlx_lm.models.cache import BatchKVCache, KVCache

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


def make_language_model(decoder_config: dict) -> qwen2.Qwen2Model:
    """The backbone without its head: embed_tokens, layers, norm (original names under `language_model.`)."""
    return qwen2.Qwen2Model(model_args(decoder_config))


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


class CFGCache:
    """Positive (row 0) and negative (row 1) KV caches as one left-padded batch.

    Built from the positive branch's prefilled cache; the negative row starts empty. Each step appends one entry to
    both rows. `drop_negative()` undoes the negative's entry on a step that produced no frame (the reference runs the
    negative branch only on diffusion steps); `reset_negative()` empties the negative row, which is how the original
    restarts the unconditional branch on every speech_start (positions restart at 0).
    """

    def __init__(self, positive: List[KVCache]):
        self.layers = []
        for c in positive:
            n = c.offset
            b = BatchKVCache([0, n])
            if n:
                k, v = c.keys_and_values()
                b.keys = mx.concatenate([k, mx.zeros_like(k)], axis=0)
                b.values = mx.concatenate([v, mx.zeros_like(v)], axis=0)
                b._idx = n
                b.offset = mx.array([n, 0])
            self.layers.append(b)

    def __iter__(self):
        return iter(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    def __len__(self):
        return len(self.layers)

    def drop_negative(self):
        """Forget the negative row's last entry (it becomes left padding)."""
        for c in self.layers:
            c.prepare(right_padding=[0, 1])
            c.finalize()

    def reset_negative(self):
        """Empty the negative row: its next token sits at position 0 and sees nothing before it."""
        for c in self.layers:
            c.left_padding = mx.array([int(c.left_padding[0].item()), c._idx])
            c.offset = mx.array([int(c.offset[0].item()), 0])
