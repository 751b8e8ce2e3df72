"""Diffusion head: checkpoint names, fast sampling path vs the reference path, float16 weights."""

import json
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from vibevoice_mlx.checkpoint import normalize_config
from vibevoice_mlx.diffusion_head import DiffusionHead, DiffusionHeadConfig, timestep_sinusoid
from vibevoice_mlx.scheduler import DPMSolver, sample_latent

TEN = DPMSolver().schedule(10)
from vibevoice_mlx.testing import assert_close

PREFIX = "model.prediction_head."


def _original_head_weights(folder):
    weights = mx.load(str(folder / "model.safetensors"))
    return {k[len(PREFIX):]: v for k, v in weights.items() if k.startswith(PREFIX)}


@pytest.fixture(scope="module")
def head(tiny):
    cfg = normalize_config(json.loads((tiny["original"] / "config.json").read_text()))
    head = DiffusionHead(DiffusionHeadConfig.from_dict(cfg["diffusion_head_config"]))
    head.load_weights(list(_original_head_weights(tiny["original"]).items()), strict=True)
    return head


def _inputs(n=2, hidden=64, latent=8, seed=0):
    rng = np.random.default_rng(seed)
    pos, neg = (mx.array(rng.standard_normal((n, hidden)).astype(np.float32)) for _ in range(2))
    return pos, neg, mx.array(rng.standard_normal((n, latent)).astype(np.float32))


def test_config_from_dict_ignores_unknown_keys():
    cfg = DiffusionHeadConfig.from_dict({"hidden_size": 96, "latent_size": 8, "head_layers": 3, "head_ffn_ratio": 3.0,
                                         "ddpm_num_steps": 1000, "prediction_type": "v_prediction", "foo": 1})
    assert (cfg.hidden_size, cfg.latent_size, cfg.head_layers, cfg.ffn_dim) == (96, 8, 3, 288)
    assert cfg.rms_norm_eps == 1e-5 and cfg.frequency_embedding_size == 256


def test_parameter_names_equal_original_keys(tiny):
    original = _original_head_weights(tiny["original"])
    cfg = normalize_config(json.loads((tiny["original"] / "config.json").read_text()))
    head = DiffusionHead(DiffusionHeadConfig.from_dict(cfg["diffusion_head_config"]))
    ours = dict(tree_flatten(head.parameters()))
    assert sorted(ours) == sorted(original)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in original.items()}
    assert "t_embedder.mlp.0.weight" in ours and "layers.1.adaLN_modulation.1.weight" in ours
    assert "final_layer.linear.weight" in ours and not any(k.startswith("final_layer.norm") for k in ours)
    head.load_weights(list(original.items()), strict=True)
    with pytest.raises(ValueError):
        head.load_weights(list(original.items())[1:], strict=True)


def test_timestep_sinusoid_is_cos_first_and_float32():
    emb = timestep_sinusoid(mx.array([0, 1]), 256)
    assert emb.dtype == mx.float32 and emb.shape == (2, 256)
    np.testing.assert_array_equal(np.array(emb[0]), [1.0] * 128 + [0.0] * 128)
    f = np.exp(-math.log(10000) * np.arange(128) / 128)
    np.testing.assert_allclose(np.array(emb[1]), np.concatenate([np.cos(f), np.sin(f)]), atol=1e-6)


def test_fast_step_equals_plain_call(head):
    pos, neg, x = _inputs()
    cond = mx.stack([pos, neg], axis=1)  # [scripts, branches, H]
    timesteps = [999, 500, 1]
    mods = head.modulations(cond, head.t_embedder(timesteps))
    assert [m.shape for m in mods] == [(2, 3, 2, 192)] * 2 + [(2, 3, 2, 128)]
    x2 = mx.stack([x, x], axis=1)
    for i, t in enumerate(timesteps):
        want = head(x2.reshape(4, -1), mx.array([t] * 4), cond.reshape(4, -1)).reshape(2, 2, -1)
        assert_close(f"predict step {i}", head.predict(x2, [m[:, i] for m in mods]), want, atol=1e-6)


@pytest.mark.parametrize("steps", [1, 10])
def test_fast_path_equals_reference_path(head, steps):
    pos, neg, noise = _inputs()
    fast = sample_latent(head, pos, neg, noise, DPMSolver().schedule(steps), 1.3)
    ref = sample_latent(head, pos, neg, noise, DPMSolver().schedule(steps), 1.3, fast=False)
    assert fast.dtype == mx.float32 and fast.shape == (2, 8)
    # observed: 0 on the tiny head (fp32)
    assert_close(f"fast vs reference sample, {steps} steps", fast, ref, atol=1e-6, rtol=1e-6)


def test_cfg_scale_one_is_the_positive_branch(head):
    pos, neg, noise = _inputs()
    a = sample_latent(head, pos, neg, noise, TEN, 1.0)
    b = sample_latent(head, pos, pos * 0 + 5, noise, TEN, 1.0)
    # v_neg + (v_pos - v_neg) rounds at the ulp of v_neg: observed 1.2e-6
    assert_close("cfg 1 ignores the negative branch", a, b, atol=1e-5)
    assert not np.allclose(np.array(a), np.array(sample_latent(head, pos, neg, noise, TEN, 2.0)), atol=1e-3)


def test_timestep_embeddings_are_computed_in_the_weights_dtype(tiny):
    """No cache hides on the head: the embeddings come from the weights of the moment, in their dtype."""
    original = _original_head_weights(tiny["original"])
    head = DiffusionHead(DiffusionHeadConfig(hidden_size=64, latent_size=8, head_layers=2))
    before = np.array(head.t_embedder([999, 500]))
    head.load_weights(list(original.items()), strict=True)
    assert not np.allclose(before, np.array(head.t_embedder([999, 500])))
    head.set_dtype(mx.float16)
    assert head.t_embedder([999, 500]).dtype == mx.float16


def test_float16_weights_give_finite_float32_latents(tiny, head):
    h16 = DiffusionHead(head.cfg)
    h16.load_weights(list(_original_head_weights(tiny["original"]).items()), strict=True)
    h16.set_dtype(mx.float16)
    assert h16.dtype == mx.float16
    pos, neg, noise = _inputs()
    v = h16(noise, mx.array([999, 999]), pos.astype(mx.float16))
    assert v.dtype == mx.float16 and bool(mx.all(mx.isfinite(v)))
    z16 = sample_latent(h16, pos, neg, noise, TEN, 1.3)
    z32 = sample_latent(head, pos, neg, noise, TEN, 1.3)
    assert z16.dtype == mx.float32 and bool(mx.all(mx.isfinite(z16)))
    # fp16 activations: observed max abs 4.2e-3 at |z| up to 3.2 (tiny random head)
    assert_close("fp16 vs fp32 weights, 10-step sample", z16, z32, atol=0.03)
    assert_close("fp16 fast vs reference path", z16, sample_latent(h16, pos, neg, noise, TEN, 1.3, fast=False), atol=1e-3)  # observed 0


def test_quantized_head_runs(tiny, head):
    hq = DiffusionHead(head.cfg)
    hq.load_weights(list(_original_head_weights(tiny["original"]).items()), strict=True)
    # noisy_images_proj has 8 inputs in the tiny head, fewer than a quantization group
    nn.quantize(hq, group_size=32, bits=8, class_predicate=lambda _, m: isinstance(m, nn.Linear) and m.weight.shape[-1] % 32 == 0)
    assert hasattr(hq.cond_proj, "scales") and hasattr(hq.t_embedder.mlp[0], "scales")
    assert hq.dtype == mx.float32
    pos, neg, noise = _inputs()
    z = sample_latent(hq, pos, neg, noise, TEN, 1.3)
    # observed max abs 5.1e-2 at |z| up to 3.2
    assert_close("8-bit head vs fp32, 10-step sample", z, sample_latent(head, pos, neg, noise, TEN, 1.3), atol=0.2)
