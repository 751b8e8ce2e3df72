"""Converted MLX folders (float32, float16, 8-bit and 4-bit language model) against the PyTorch reference.

The tiny checkpoint goes through `convert`, is loaded back with `load_model`, and every component is run on the
same fixed inputs as transformers' VibeVoice on the source weights.
"""

import mlx.core as mx
import numpy as np
import pytest
import torch

from vibevoice_mlx import backbone
from vibevoice_mlx.convert.convert import convert
from vibevoice_mlx.loader import load_model
from vibevoice_mlx.testing import assert_close, snr_db

HOP, LATENT, SEMANTIC, HIDDEN = 16, 8, 12, 64

# (folder dtype, runtime dtype, quantize bits) -> per-component atol as a fraction of the signal scale.
# Observed fractions are in the comments (tiny fixture, CPU backend).
CASES = {
    "float32": (("float32", "float32", None), {
        "backbone": 1e-4,        # 3.0e-7
        "head": 1e-4,            # 6.9e-7
        "decoder": 1e-4,         # 4.2e-7
        "encoder": 1e-4,         # 5.3e-7
        "semantic": 1e-4,        # 4.8e-7
        "connectors": 1e-4,      # 1.9e-7
    }),
    "float16": (("float16", "float16", None), {
        "backbone": 1e-2,        # 1.0e-3 (SNR 59 dB)
        "head": 1e-2,            # 1.0e-3 (60 dB)
        "decoder": 1e-2,         # 1.5e-3 (58 dB)
        "encoder": 1e-2,         # 1.2e-3 (58 dB)
        "semantic": 1e-2,        # 2.7e-3 (52 dB)
        "connectors": 1e-2,      # 7.1e-4 (64 dB)
    }),
    # Only the language model is quantized; everything else is the float16 case, bit for bit.
    "8-bit": (("float16", "float16", 8), {
        "backbone": 3e-2,        # 1.1e-2 (SNR 40 dB)
        "head": 1e-2, "decoder": 1e-2, "encoder": 1e-2, "semantic": 1e-2, "connectors": 1e-2,
    }),
    "4-bit": (("float16", "float16", 4), {
        # 1.3e-1 (SNR 16.5 dB): 4-bit groups of 64 on random Gaussian weights of a 64-wide model; trained
        # weights quantize better, which only a real checkpoint can show.
        "backbone": 2.5e-1,
        "head": 1e-2, "decoder": 1e-2, "encoder": 1e-2, "semantic": 1e-2, "connectors": 1e-2,
    }),
}


@pytest.fixture(scope="module")
def reference(tiny):
    from transformers import VibeVoiceForConditionalGeneration

    return VibeVoiceForConditionalGeneration.from_pretrained(tiny["transformers"], dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return {
        "embeds": f32(1, 12, HIDDEN),
        "x": f32(3, LATENT), "t": np.array([999, 500, 0], np.float32), "cond": f32(3, HIDDEN),
        "z": f32(1, 5, LATENT),
        "audio": (0.3 * f32(1, 5 * HOP)),
        "acoustic": f32(1, 4, LATENT), "semantic": f32(1, 4, SEMANTIC),
    }


def _reference_outputs(ref, i):
    m = ref.model
    with torch.no_grad():
        t = lambda a: torch.from_numpy(a)  # noqa: E731
        return {
            "backbone": m.language_model(inputs_embeds=t(i["embeds"])).last_hidden_state,
            "head": m.diffusion_head(t(i["x"]), t(i["t"]), condition=t(i["cond"])),
            "decoder": m.audio_tower.decode(t(i["z"])).audio[:, 0],
            "encoder": m.audio_tower.encode(t(i["audio"])[:, None], sample=False).latents,
            "semantic": m.semantic_tokenizer_encoder(t(i["audio"])[:, None]).latents,
            "connectors": m.multi_modal_projector(t(i["acoustic"])) + m.semantic_connector(t(i["semantic"])),
        }


def _mlx_outputs(model, i):
    m = model.model
    dtype = mx.float16 if m.language_model.norm.weight.dtype == mx.float16 else mx.float32
    a = lambda x: mx.array(x).astype(dtype)  # noqa: E731
    cache = backbone.make_cache(m.language_model)
    hidden = mx.concatenate([backbone.forward(m.language_model, a(i["embeds"][:, s:s + 5]), cache)
                             for s in range(0, 12, 5)], axis=1)
    return {
        "backbone": hidden,
        "head": m.prediction_head(a(i["x"]), mx.array(i["t"]), a(i["cond"])),
        "decoder": m.acoustic_tokenizer.decoder(a(i["z"]))[..., 0],
        "encoder": m.acoustic_tokenizer.encoder(a(i["audio"])[..., None]),
        "semantic": m.semantic_tokenizer.encoder(a(i["audio"])[..., None]),
        "connectors": m.acoustic_connector(a(i["acoustic"])) + m.semantic_connector(a(i["semantic"])),
    }


@pytest.mark.parametrize("case", list(CASES))
def test_converted_folder_matches_reference(tiny, reference, inputs, tmp_path, case):
    (folder_dtype, runtime, bits), tolerances = CASES[case]
    folder = convert(str(tiny["original"]), tmp_path / case, dtype=folder_dtype, quantize=bits is not None,
                     q_bits=bits, tokenizer=str(tiny["tokenizer"]))
    model, _ = load_model(folder, dtype=runtime)
    if bits:
        assert isinstance(model.model.language_model.layers[0].mlp.up_proj, __import__("mlx.nn").nn.QuantizedLinear)
    want, got = _reference_outputs(reference, inputs), _mlx_outputs(model, inputs)
    for name, frac in tolerances.items():
        scale = float(want[name].abs().max())
        err = assert_close(f"converted {case} {name}", got[name], want[name], atol=frac * scale)
        print(f"[parity] converted {case} {name}: error/scale {err / scale:.1e}, SNR {snr_db(got[name], want[name]):.1f} dB")
