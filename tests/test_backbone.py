"""The mlx-lm backbone adapter and the batched two-branch CFG cache."""

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from vibevoice_mlx import backbone
from vibevoice_mlx.fixtures import tiny_config


def _lm(seed=0):
    mx.random.seed(seed)
    lm = backbone.make_language_model(backbone.model_args(tiny_config()["decoder_config"]))
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
    cfg = backbone.CFGCache.from_prompt(pos)
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


def test_slots_join_and_leave_without_disturbing_each_other():
    """Two scripts of different prompt lengths in one cache: each slot's rows equal its script run alone, as a
    slot joins mid-way (left padding grows) and another leaves (filter)."""
    lm = _lm()
    a, b = mx.random.normal((1, 9, 64)), mx.random.normal((1, 4, 64))
    solo = [_batched(lm, p, [(True, False)] * 4) for p in (a, b)]

    def one_slot(prompt):
        pos = backbone.make_cache(lm)
        backbone.prefill(lm, prompt[:, :-1], pos)
        return backbone.CFGCache.from_prompt(pos)

    cfg = one_slot(a)
    xa = a[:, -1:]
    h = backbone.forward(lm, mx.concatenate([xa, xa]), cfg)  # script a's first step alone
    np.testing.assert_allclose(np.array(h[:1]), np.array(solo[0][0][0]), atol=2e-5)
    xa = h[:1] * 0.5
    cfg.add(one_slot(b))  # b joins: its prompt is shorter, it is left-padded
    assert cfg.slots == 2
    xb = b[:, -1:]
    for step in range(3):
        h = backbone.forward(lm, mx.repeat(mx.concatenate([xa, xb]), 2, axis=0), cfg)
        np.testing.assert_allclose(np.array(h[0:1]), np.array(solo[0][step + 1][0]), atol=2e-5)
        np.testing.assert_allclose(np.array(h[1:2]), np.array(solo[0][step + 1][1]), atol=2e-5)
        np.testing.assert_allclose(np.array(h[2:3]), np.array(solo[1][step][0]), atol=2e-5)
        np.testing.assert_allclose(np.array(h[3:4]), np.array(solo[1][step][1]), atol=2e-5)
        xa, xb = h[0:1] * 0.5, h[2:3] * 0.5
    cfg.keep([1])  # a leaves; b goes on alone
    h = backbone.forward(lm, mx.repeat(xb, 2, axis=0), cfg)
    np.testing.assert_allclose(np.array(h[:1]), np.array(solo[1][3][0]), atol=2e-5)


def test_mlx_lm_batch_cache_internals_we_rely_on():
    """CFGCache uses BatchKVCache's merge/extend/filter/prepare/finalize and its `state` tuple; pin them."""
    from mlx_lm.models.cache import BatchKVCache, KVCache

    kv = KVCache()
    kv.update_and_fetch(mx.ones((1, 2, 3, 4)), mx.ones((1, 2, 3, 4)))
    b = BatchKVCache.merge([kv, KVCache()])
    keys, values, offset, left_padding, idx = b.state
    assert keys.shape[0] == 2 and idx == 3
    assert offset.tolist() == [3, 0] and left_padding.tolist() == [0, 3]
    for name in ("extend", "filter", "prepare", "finalize", "make_mask"):
        assert callable(getattr(b, name))
    b.prepare(right_padding=[1, 0])
    b.finalize()
    assert b.state[3].tolist() == [1, 3] and b.state[2].tolist() == [2, 0]


def test_decode_layout_gives_the_same_products_and_holds_one_extra_matrix():
    import mlx.nn as nn

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = [nn.Linear(256, 1024, bias=i % 2 == 0) for i in range(6)]

        def __call__(self, x):
            return [layer(x) for layer in self.layers]

    mx.random.seed(0)
    stack = Stack()
    mx.eval(stack.parameters())
    x = mx.random.normal((2, 256))
    want = stack(x)
    mx.eval(want)
    one = 256 * 1024 * 4
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    assert backbone.to_decode_layout(stack) == 6
    extra = mx.get_peak_memory() - before
    # Replaced one at a time: the old matrix is freed before the next is made (all at once would be 6 more).
    assert extra <= 2 * one, f"peak {extra / one:.2f} matrices above the start"
    assert all(isinstance(layer, backbone.DecodeLinear) for layer in stack.layers)
    for got, ref in zip(stack(x), want):
        err = float(mx.abs(got - ref).max())
        assert err < 1e-4, f"max abs error {err}"  # float32, 256-term sums in another order (observed ~1e-6)
