"""The real 1.5B configuration with random weights: backbone and connectors against transformers (opt-in).

    pytest parity_tests --run-slow -s

The tokenizers and the diffusion head have their own full-size tests in their parity files. Needs about 13 GB
of memory (the 1.5B language model in float32, once in each framework).
"""

import mlx.core as mx
import numpy as np
import pytest
import torch

from vibevoice_mlx import backbone
from vibevoice_mlx.keys import original_to_transformers
from vibevoice_mlx.checkpoint import to_transformers_config
from vibevoice_mlx.fixtures import random_tensor, real_config
from vibevoice_mlx.connector import SpeechConnector
from vibevoice_mlx.testing import assert_close

pytestmark = pytest.mark.slow


def _load_both(torch_module, mlx_module, prefix, seed=0):
    """Same random weights (keyed by original name) into a transformers module and an MLX module."""
    state = {}
    mlx_weights = []
    for mlx_name, p in __import__("mlx.utils", fromlist=["tree_flatten"]).tree_flatten(mlx_module.parameters()):
        original = prefix + mlx_name
        t = random_tensor(original, tuple(p.shape), seed).float()
        mlx_weights.append((mlx_name, mx.array(t.numpy())))
        state[original] = t
    mlx_module.load_weights(mlx_weights, strict=True)
    mx.eval(mlx_module.parameters())
    return state


def test_backbone_full_size_1_5b():
    from transformers import Qwen2Config, Qwen2Model

    cfg = real_config("1.5b")
    lm = backbone.make_language_model(backbone.model_args(cfg["decoder_config"]))
    state = _load_both(None, lm, "model.language_model.")
    text = to_transformers_config(cfg)["text_config"]
    with torch.device("meta"):
        ref = Qwen2Model(Qwen2Config(**text))
    prefix = "model.language_model."
    ref.load_state_dict({k[len(prefix):]: v for k, v in state.items()}, strict=True, assign=True)
    ref.rotary_emb = type(ref.rotary_emb)(config=ref.config)  # a buffer, not in the state dict: rebuild off meta
    ref.eval()
    del state
    x = np.random.default_rng(0).standard_normal((1, 40, 1536)).astype(np.float32)
    with torch.no_grad():
        want = ref(inputs_embeds=torch.from_numpy(x)).last_hidden_state
    cache = backbone.make_cache(lm)
    got = mx.concatenate([backbone.forward(lm, mx.array(x[:, s : s + 16]), cache) for s in range(0, 40, 16)], 1)
    # observed max abs error 2.0e-5 at signal scale 5.7 (28 layers, 40 tokens in chunks of 16)
    assert_close("full-size 1.5B backbone, chunked prefill", got, want, atol=1e-4 * float(want.abs().max()))


@pytest.mark.parametrize("name, d_in", [("acoustic_connector", 64), ("semantic_connector", 128)])
def test_connectors_full_size_1_5b(name, d_in):
    from transformers.models.vibevoice.modeling_vibevoice import VibeVoiceMultiModalProjector

    conn = SpeechConnector(d_in, 1536)
    state = _load_both(None, conn, f"model.{name}.")
    ref = VibeVoiceMultiModalProjector(d_in, 1536)
    prefix = "model." + ("multi_modal_projector" if name == "acoustic_connector" else name) + "."
    ref.load_state_dict({original_to_transformers(k)[len(prefix):]: v for k, v in state.items()}, strict=True)
    x = np.random.default_rng(1).standard_normal((3, 5, d_in)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x))
    got = conn(mx.array(x))
    # observed max abs error 6.4e-6 (acoustic) and 7.2e-6 (semantic) at signal scale 4.2
    assert_close(f"full-size 1.5B {name}", got, want, atol=1e-4 * float(want.abs().max()))
