"""Diffusion head, DPM-Solver++ and the CFG latent sampler against transformers 5.23 and diffusers.

The reference draws its initial noise with `torch.randn` inside `_sample_audio_latent`; the tests patch it to
return the same noise the MLX sampler gets.
"""

from types import SimpleNamespace
from unittest import mock

import mlx.core as mx
import numpy as np
import pytest
import torch

from vibevoice_mlx.keys import transformers_to_original
from vibevoice_mlx.diffusion_head import DiffusionHead, DiffusionHeadConfig
from vibevoice_mlx.scheduler import DPMSolver, sample_latent
from vibevoice_mlx.testing import assert_close

PREFIX = "model.prediction_head."


def _diffusers_scheduler():
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")


def _mlx_head(cfg: DiffusionHeadConfig, weights) -> DiffusionHead:
    head = DiffusionHead(cfg)
    head.load_weights([(k[len(PREFIX):], v) for k, v in weights.items() if k.startswith(PREFIX)], strict=True)
    return head


@pytest.fixture(scope="module")
def reference(tiny):
    from transformers import VibeVoiceForConditionalGeneration

    return VibeVoiceForConditionalGeneration.from_pretrained(tiny["transformers"], dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def head(tiny, reference):
    hc = reference.config.diffusion_head_config
    cfg = DiffusionHeadConfig(hidden_size=hc.hidden_size, latent_size=hc.latent_size, head_layers=hc.num_hidden_layers,
                              head_ffn_ratio=hc.intermediate_size / hc.hidden_size, rms_norm_eps=hc.rms_norm_eps)
    return _mlx_head(cfg, mx.load(str(tiny["original"] / "model.safetensors")))


def _rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _reference_sample(model, pos, neg, noise, steps, cfg_scale):
    """transformers' own loop, with its torch.randn replaced by [noise; zeros] (it uses only the first half).

    `model` is the full reference or anything with `.model.diffusion_head` and `.config.audio_config.hidden_size`.
    """
    from transformers import VibeVoiceForConditionalGeneration

    fake = torch.cat([torch.from_numpy(noise), torch.zeros_like(torch.from_numpy(noise))])

    def randn(*shape, **kwargs):
        assert tuple(shape) == tuple(fake.shape), shape
        return fake.clone()

    with torch.no_grad(), mock.patch.object(torch, "randn", randn):
        out = VibeVoiceForConditionalGeneration._sample_audio_latent(
            model, torch.from_numpy(pos), torch.from_numpy(neg), _diffusers_scheduler(), steps, cfg_scale)
    return out[:, 0]


def test_head_single_call(reference, head):
    rng = np.random.default_rng(0)
    t = np.array([999, 899, 500, 100, 1, 0], dtype=np.float32)
    x, c = _rand(rng, 6, head.cfg.latent_size), _rand(rng, 6, head.cfg.hidden_size)
    with torch.no_grad():
        want = reference.model.diffusion_head(torch.from_numpy(x), torch.from_numpy(t), condition=torch.from_numpy(c))
    got = head(mx.array(x), mx.array(t), mx.array(c))
    assert got.dtype == mx.float32
    # observed: max abs 4.1e-6 at |v| up to 2.9 (1e-4 x signal would be 3e-4)
    assert_close("head single call fp32", got, want, atol=3e-5)


@pytest.mark.parametrize("n", [1, 2, 5, 10, 20])
def test_scheduler_tables_vs_diffusers(n):
    ref = _diffusers_scheduler()
    ref.set_timesteps(n)
    ours = DPMSolver()
    assert ours.timesteps(n) == ref.timesteps.tolist()
    # observed: 0 for n <= 10, 1.2e-7 (one ulp of sigma 0.09) at n = 20
    assert_close(f"sigmas n={n}", ours.sigmas(n), ref.sigmas.numpy(), atol=0, rtol=2e-6)


@pytest.mark.parametrize("n", [5, 10, 20])
def test_scheduler_trajectory_vs_diffusers(n):
    """Same initial x and the same fixed model output per step on both sides."""
    rng = np.random.default_rng(n)
    x_init = _rand(rng, 3, 64)
    outputs = [_rand(rng, 3, 64) for _ in range(n)]
    ref = _diffusers_scheduler()
    ref.set_timesteps(n)
    xt, xm, x0 = torch.from_numpy(x_init), mx.array(x_init), None
    for i, t in enumerate(ref.timesteps):
        xt = ref.step(torch.from_numpy(outputs[i]), t, xt).prev_sample
        xm, x0 = DPMSolver().schedule(n).step(mx.array(outputs[i]), xm, i, x0)
        # observed: up to 1.7e-6 at |x| up to 3.6 (n = 20, last steps; one-ulp coefficient differences add up)
        assert_close(f"trajectory n={n} step {i}", xm, xt, atol=1e-5)


@pytest.mark.parametrize("fast", [True, False])
def test_cfg_sample_vs_transformers(reference, head, fast):
    rng = np.random.default_rng(1)
    pos, neg = _rand(rng, 2, head.cfg.hidden_size), _rand(rng, 2, head.cfg.hidden_size)
    noise = _rand(rng, 2, head.cfg.latent_size)
    want = _reference_sample(reference, pos, neg, noise, 10, 1.3)
    got = sample_latent(head, mx.array(pos), mx.array(neg), mx.array(noise), DPMSolver().schedule(10), 1.3, fast=fast)
    assert got.dtype == mx.float32
    # observed: max abs 2.1e-6 (fast and reference path) at |z| up to 3.5
    assert_close(f"10-step CFG sample fp32 ({'fast' if fast else 'reference'} path)", got, want, atol=3e-5)


def test_cfg_sample_float16_weights_vs_float32_torch(tiny, reference, head):
    h16 = _mlx_head(head.cfg, mx.load(str(tiny["original"] / "model.safetensors")))
    h16.set_dtype(mx.float16)
    rng = np.random.default_rng(2)
    pos, neg = _rand(rng, 2, head.cfg.hidden_size), _rand(rng, 2, head.cfg.hidden_size)
    noise = _rand(rng, 2, head.cfg.latent_size)
    want = _reference_sample(reference, pos, neg, noise, 10, 1.3)
    got = sample_latent(h16, mx.array(pos), mx.array(neg), mx.array(noise), DPMSolver().schedule(10), 1.3)
    assert got.dtype == mx.float32
    # fp16 weights and activations, fp32 solver: observed max abs 3.8e-3 at |z| up to 6.3
    assert_close("10-step CFG sample, MLX fp16 weights vs torch fp32", got, want, atol=3e-2)


@pytest.mark.slow
def test_full_size_head_1p5b():
    """The 1.5B head size (hidden 1536, 4 layers, ffn 4608) with seeded random weights loaded into both."""
    from transformers.models.vibevoice.configuration_vibevoice import VibeVoiceDiffusionHeadConfig
    from transformers.models.vibevoice.modeling_vibevoice import VibeVoiceDiffusionHead
    from vibevoice_mlx.fixtures import random_tensor

    hidden, latent = 1536, 64
    ref = VibeVoiceDiffusionHead(VibeVoiceDiffusionHeadConfig(hidden_size=hidden, latent_size=latent,
                                                              num_hidden_layers=4, intermediate_size=3 * hidden))
    state = {k: random_tensor(transformers_to_original("model.diffusion_head." + k), tuple(v.shape), 0)
             for k, v in ref.state_dict().items()}
    ref.load_state_dict(state, strict=True)
    ref.eval()
    weights = {transformers_to_original("model.diffusion_head." + k): mx.array(v.numpy()) for k, v in state.items()}
    cfg = DiffusionHeadConfig(hidden_size=hidden, latent_size=latent, head_layers=4, head_ffn_ratio=3.0)
    head = _mlx_head(cfg, weights)

    rng = np.random.default_rng(3)
    t = np.array([999, 899, 500, 100, 1, 0], dtype=np.float32)
    x, c = _rand(rng, 6, latent), _rand(rng, 6, hidden)
    with torch.no_grad():
        want = ref(torch.from_numpy(x), torch.from_numpy(t), condition=torch.from_numpy(c))
    # observed: max abs 1.05e-5 at |v| up to 4.5 (fp32 sums over 1536 / 4608 terms in another order)
    assert_close("1.5B head single call fp32", head(mx.array(x), mx.array(t), mx.array(c)), want, atol=5e-5)

    pos, neg, noise = _rand(rng, 1, hidden), _rand(rng, 1, hidden), _rand(rng, 1, latent)
    # Only the head is built at full size; the sampler needs nothing else from the model.
    shell = SimpleNamespace(model=SimpleNamespace(diffusion_head=ref),
                            config=SimpleNamespace(audio_config=SimpleNamespace(hidden_size=latent)))
    want = _reference_sample(shell, pos, neg, noise, 10, 1.3)
    for fast in (True, False):
        got = sample_latent(head, mx.array(pos), mx.array(neg), mx.array(noise), DPMSolver().schedule(10), 1.3, fast=fast)
        # observed: max abs 1.0e-5 at |z| up to 7.8, both paths
        assert_close(f"1.5B 10-step CFG sample fp32 (fast={fast})", got, want, atol=1e-4)
    head.set_dtype(mx.float16)
    got = sample_latent(head, mx.array(pos), mx.array(neg), mx.array(noise), DPMSolver().schedule(10), 1.3)
    # observed: max abs 7.2e-3 at |z| up to 7.8
    assert_close("1.5B 10-step CFG sample, MLX fp16 vs torch fp32", got, want, atol=6e-2)
