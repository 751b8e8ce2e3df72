"""Backbone parity: mlx-lm's Qwen2 (our adapter) against transformers' Qwen2 inside VibeVoice, same weights."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

from vibevoice_mlx import backbone
from vibevoice_mlx.fixtures import tiny_config
from vibevoice_mlx.testing import assert_close

torch.manual_seed(0)


@pytest.fixture(scope="module")
def pair(tiny):
    from transformers import VibeVoiceForConditionalGeneration

    ref = VibeVoiceForConditionalGeneration.from_pretrained(tiny["transformers"], dtype=torch.float32).eval()
    weights = mx.load(str(tiny["original"] / "model.safetensors"))
    prefix = "model.language_model."
    lm = backbone.make_language_model(backbone.model_args(tiny_config()["decoder_config"]))
    lm.load_weights([(k[len(prefix):], v) for k, v in weights.items() if k.startswith(prefix)], strict=True)
    mx.eval(lm.parameters())
    return ref, lm


def _embeds(n, seed=1):
    return np.random.default_rng(seed).standard_normal((1, n, 64)).astype(np.float32)


def test_hidden_states_per_layer(pair):
    ref, lm = pair
    x = _embeds(11)
    with torch.no_grad():
        out = ref.model.language_model(inputs_embeds=torch.from_numpy(x), output_hidden_states=True)
    # walk the mlx-lm layers by hand to compare every layer's output (localizes a numerics problem)
    h = mx.array(x)
    for i, layer in enumerate(lm.layers):
        h = layer(h, "causal", None)
        want = out.hidden_states[i + 1]
        if i == len(lm.layers) - 1:
            h_cmp, want = lm.norm(h), out.last_hidden_state
        else:
            h_cmp = h
        # observed max abs error 1.7e-6 at signal scale 5
        assert_close(f"backbone layer {i}", h_cmp, want, atol=1e-4 * float(want.abs().max()))


def test_kv_cached_prefill_in_chunks(pair):
    ref, lm = pair
    x = _embeds(23, seed=2)
    with torch.no_grad():
        want = ref.model.language_model(inputs_embeds=torch.from_numpy(x)).last_hidden_state
    cache = backbone.make_cache(lm)
    got = [backbone.forward(lm, mx.array(x[:, s : s + 8]), cache) for s in range(0, 23, 8)]
    got = mx.concatenate(got, axis=1)
    # observed max abs error 1.8e-6 at signal scale 4
    assert_close("backbone chunked prefill", got, want, atol=1e-4 * float(want.abs().max()))


def test_float16_backbone_against_float32_reference(pair):
    ref, lm32 = pair
    lm = backbone.make_language_model(backbone.model_args(tiny_config()["decoder_config"]))
    lm.load_weights([(k, v.astype(mx.float16)) for k, v in tree_flatten(lm32.parameters())])
    x = _embeds(16, seed=3)
    with torch.no_grad():
        want = ref.model.language_model(inputs_embeds=torch.from_numpy(x)).last_hidden_state
    got = backbone.forward(lm, mx.array(x).astype(mx.float16), backbone.make_cache(lm))
    assert got.dtype == mx.float16
    # float16 weights and activations: observed max abs error 3.7e-3 at signal scale 4.4
    assert_close("backbone float16", got, want, atol=1e-2 * float(want.abs().max()))
