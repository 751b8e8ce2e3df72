"""Connectors and latent scaling against transformers on the tiny fixture."""

import mlx.core as mx
import numpy as np
import pytest
import torch

from vibevoice_mlx.loader import load_model
from vibevoice_mlx.testing import assert_close


@pytest.fixture(scope="module")
def pair(tiny):
    from transformers import VibeVoiceForConditionalGeneration

    ref = VibeVoiceForConditionalGeneration.from_pretrained(tiny["transformers"], dtype=torch.float32).eval()
    model, _ = load_model(tiny["original"], dtype="float32")
    return ref, model


@pytest.mark.parametrize("ours, theirs, d_in", [("acoustic_connector", "multi_modal_projector", 8),
                                                ("semantic_connector", "semantic_connector", 12)])
def test_connector(pair, ours, theirs, d_in):
    ref, model = pair
    x = np.random.default_rng(0).standard_normal((2, 7, d_in)).astype(np.float32)
    with torch.no_grad():
        want = getattr(ref.model, theirs)(torch.from_numpy(x))
    got = getattr(model.model, ours)(mx.array(x))
    # observed max abs error 1.2e-6 at signal scale 3.3
    assert_close(f"{ours}", got, want, atol=1e-4 * float(want.abs().max()))


def test_latent_scaling_round_trip(pair):
    ref, model = pair
    z = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)
    scale, bias = ref.model.latent_scaling_factor.item(), ref.model.latent_bias_factor.item()
    assert scale != 1.0 and bias != 0.0, "fixture scalars are trivial: the test would prove nothing"
    got = model.scale_latents(mx.array(z))
    assert_close("latent scaling", got, (z + bias) * scale, atol=1e-6)
    assert_close("latent unscaling", model.unscale_latents(got), z, atol=1e-6)


def test_logits_of_control_tokens_equal_full_lm_head(pair):
    """Scoring only the four control-token rows gives the reference's logits for those tokens."""
    ref, model = pair
    h = np.random.default_rng(2).standard_normal((1, 64)).astype(np.float32)
    ids = (257, 258, 259, 256)
    with torch.no_grad():
        want = ref.lm_head(torch.from_numpy(h))[0, list(ids)]
    got = mx.array(h) @ model.head_rows(ids).T
    assert_close("control-token logits", got[0], want, atol=1e-5 * float(want.abs().max()))
