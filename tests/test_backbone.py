"""The mlx-lm backbone adapter and the batched two-branch CFG cache."""

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from vibevoice_mlx import backbone
from vibevoice_mlx.fixtures import tiny_config


def _lm(seed=0):
    mx.random.seed(seed)
    lm = backbone.make_language_model(tiny_config()["decoder_config"])
    mx.eval(lm.parameters())
    return lm


def test_mlx_lm_parameter_names_are_the_checkpoint_names():
    lm = _lm()
    names = set(dict(tree_flatten(lm.parameters())))
    layers = tiny_config()["decoder_config"]["num_hidden_layers"]
    expected = {"embed_tokens.weight", "norm.weight"}
    expected |= {f"layers.{i}.{p}" for i in range(layers) for p in backbone.LAYER_PARAMS}
    assert names == expected


def _separate(lm, prompt, steps):
    """Reference: two independent KV caches, the negative run only on steps that keep it."""
    pos, neg = backbone.make_cache(lm), backbone.make_cache(lm)
    backbone.prefill(lm, prompt[:, :-1], pos)
    outs = []
    x = prompt[:, -1:]
    for keep, reset in steps:
        hp = backbone.forward(lm, x, pos)
        if reset:
            neg = backbone.make_cache(lm)
        hn = backbone.forward(lm, x, neg) if keep else None
        outs.append((hp, hn))
        x = hp * 0.5  # any next input, the same for both branches
    return outs


def _batched(lm, prompt, steps):
    pos = backbone.make_cache(lm)
    backbone.prefill(lm, prompt[:, :-1], pos)
    cfg = backbone.CFGCache(pos)
    outs = []
    x = prompt[:, -1:]
    for keep, reset in steps:
        if reset:
            cfg.reset_negative()
        h = backbone.forward(lm, mx.concatenate([x, x]), cfg)
        outs.append((h[:1], h[1:] if keep else None))
        if not keep:
            cfg.drop_negative()
        x = h[:1] * 0.5
    return outs


def test_batched_cfg_cache_equals_two_separate_caches():
    lm = _lm()
    prompt = mx.random.normal((1, 9, 64))
    # (negative consumes this step?, negative reset before this step?) — the reset pattern of a second
    # speech segment: frames, a dropped step, a reset, frames again.
    steps = [(True, False), (True, False), (False, False), (True, False), (False, False), (True, True),
             (True, False), (False, False), (True, False)]
    ref, got = _separate(lm, prompt, steps), _batched(lm, prompt, steps)
    for i, ((rp, rn), (gp, gn)) in enumerate(zip(ref, got)):
        np.testing.assert_allclose(np.array(gp), np.array(rp), atol=2e-5, err_msg=f"positive step {i}")
        if rn is not None:
            np.testing.assert_allclose(np.array(gn), np.array(rn), atol=2e-5, err_msg=f"negative step {i}")


def test_reset_negative_restarts_at_position_zero():
    lm = _lm()
    prompt = mx.random.normal((1, 5, 64))
    steps = [(True, False), (True, False), (True, True)]
    got = _batched(lm, prompt, steps)
    # after a reset the negative sees only its new input at position 0: the same as a fresh branch
    fresh = backbone.forward(lm, got[1][0] * 0.5, backbone.make_cache(lm))
    np.testing.assert_allclose(np.array(got[2][1]), np.array(fresh), atol=2e-5)
    assert not np.allclose(np.array(got[1][1]), np.array(got[2][1]))


def test_prefill_in_chunks_equals_one_pass():
    lm = _lm()
    x = mx.random.normal((1, 13, 64))
    a = backbone.prefill(lm, x, backbone.make_cache(lm), chunk_size=4)
    b = backbone.prefill(lm, x, backbone.make_cache(lm), chunk_size=512)
    np.testing.assert_allclose(np.array(a), np.array(b), atol=2e-5)
