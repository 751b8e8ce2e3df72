"""The committed VibeVoice-Realtime golden data (tests/data/realtime_tiny, recorded from Microsoft's code by
parity_tests/realtime_reference.py) is self-consistent: the tiny model has the released key structure scaled to its
config, the preset has the released format, and every recorded tensor has the shape the config implies and the
relations realtime.md §4 states (conditions, positions, forced stop, dead frames). Needs neither torch nor the
reference environment."""

import gzip
import json
import pickletools
import re
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from vibevoice_mlx.keys import mlx_transpose

DATA = Path(__file__).parent / "data" / "realtime_tiny"
GOLDEN = json.loads((DATA / "golden.json").read_text())
CFG = json.loads((DATA / "model" / "config.json").read_text())
DEC, ACO, HEAD = CFG["decoder_config"], CFG["acoustic_tokenizer_config"], CFG["diffusion_head_config"]
H, VAE, HOP = DEC["hidden_size"], ACO["vae_dim"], GOLDEN["hop"]
TTS_LAYERS = CFG["tts_backbone_num_hidden_layers"]
LM_LAYERS = DEC["num_hidden_layers"] - TTS_LAYERS
HEAD_DIM = H // DEC["num_attention_heads"]
KV = DEC["num_key_value_heads"]
P, K = GOLDEN["voice"]["P"], GOLDEN["voice"]["K"]
S = P + K
_DTYPES = {"F32": np.float32, "I64": np.int64}


def _header(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    return header, raw[8 + n:]


def _load(path):
    """safetensors -> numpy without torch; bf16 widened to float32 exactly."""
    header, body = _header(path)
    out = {}
    for key, info in header.items():
        a, b = info["data_offsets"]
        if info["dtype"] == "BF16":
            bits = np.frombuffer(body[a:b], dtype="<u2").astype(np.uint32) << 16
            value = bits.view(np.float32)
        else:
            value = np.frombuffer(body[a:b], dtype=_DTYPES[info["dtype"]])
        out[key] = value.reshape(info["shape"])
    return out


def _to_bf16(x):
    """float32 -> bf16 (round to nearest even) -> float32, as torch's cast does for finite values."""
    bits = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    return bits.astype(np.uint32).view(np.float32)


def _structure(key):
    """A key with its layer / stage-block indices replaced, so a tiny model and the release compare."""
    key = re.sub(r"\.layers\.\d+\.", ".layers.*.", key)
    return re.sub(r"\.stages\.(\d+)\.\d+\.", r".stages.\1.*.", key)


def _real_keys():
    with gzip.open(DATA / "weight-keys-realtime-0.5b.tsv.gz", "rt") as f:
        rows = [line.rstrip("\n").split("\t") for line in f if not line.startswith(("#", "original_key"))]
    return {key: (json.loads(shape), transform) for key, _, shape, transform in rows}


@pytest.fixture(scope="module")
def weights():
    header, _ = _header(DATA / "model" / "model.safetensors")
    return header


def test_weights_have_the_released_key_structure(weights):
    real = _real_keys()
    assert len(real) == 605
    assert {_structure(k) for k in weights} == {_structure(k) for k in real}
    assert not any(k.startswith("model.acoustic_tokenizer.encoder.") for k in weights)
    assert "model.language_model.norm.weight" not in weights and "lm_head.weight" not in weights
    assert all(info["dtype"] == "BF16" for info in weights.values())  # as the release
    # the tiny's layer counts are the config's, and the two stacks differ
    for prefix, n in (("model.language_model", LM_LAYERS), ("model.tts_language_model", TTS_LAYERS),
                      ("model.prediction_head", HEAD["head_layers"])):
        found = {int(m.group(1)) for k in weights for m in [re.match(rf"{prefix}\.layers\.(\d+)\.", k)] if m}
        assert found == set(range(n)), prefix
    assert LM_LAYERS != TTS_LAYERS
    # the decoder's stage depths are the reversed encoder depths (decoder_depths is null, as released)
    depths = [int(d) for d in reversed(ACO["encoder_depths"].split("-"))]
    for i, d in enumerate(depths):
        found = {int(m.group(1)) for k in weights
                 for m in [re.match(rf"model\.acoustic_tokenizer\.decoder\.stages\.{i}\.(\d+)\.", k)] if m}
        assert found == set(range(d)), i
    # transposes by name agree with the real table, and rank-3 keys are exactly the conv ones
    real_by_structure = {_structure(k): t for k, (_, t) in real.items()}
    for key, info in weights.items():
        perm = mlx_transpose(key)
        assert (perm is not None) == (len(info["shape"]) == 3), key
        transform = real_by_structure[_structure(key)]
        assert (transform == "-") == (perm is None), key
        if perm is not None:
            assert transform.startswith("transpose(%d,%d,%d)" % perm), key


def test_weight_shapes_follow_the_config(weights):
    shape = {k: v["shape"] for k, v in weights.items()}
    for prefix in ("model.language_model", "model.tts_language_model"):
        assert shape[f"{prefix}.embed_tokens.weight"] == [DEC["vocab_size"], H]
        attn = f"{prefix}.layers.0.self_attn"
        assert shape[f"{attn}.q_proj.weight"] == [H, H]
        assert shape[f"{attn}.k_proj.weight"] == shape[f"{attn}.v_proj.weight"] == [KV * HEAD_DIM, H]
        assert shape[f"{prefix}.layers.0.mlp.down_proj.weight"] == [H, DEC["intermediate_size"]]
    assert KV < DEC["num_attention_heads"] and HEAD_DIM >= 16  # GQA
    assert shape["model.tts_input_types.weight"] == [2, H]
    assert shape["model.speech_scaling_factor"] == shape["model.speech_bias_factor"] == []
    assert shape["model.acoustic_connector.fc1.weight"] == [H, VAE]
    assert shape["tts_eos_classifier.fc2.weight"] == [1, H]
    assert shape["model.prediction_head.noisy_images_proj.weight"] == [H, HEAD["latent_size"]]
    ffn = int(HEAD["hidden_size"] * HEAD["head_ffn_ratio"])
    assert shape["model.prediction_head.layers.0.ffn.gate_proj.weight"] == [ffn, H]
    # decoder: real ratios, channels n_filters * 2^(stages left), transposed-conv kernels 2 * stride
    assert ACO["decoder_ratios"] == [8, 5, 5, 4, 2, 2] and int(np.prod(ACO["decoder_ratios"])) == HOP
    channels = ACO["decoder_n_filters"] * 2 ** len(ACO["decoder_ratios"])
    assert shape["model.acoustic_tokenizer.decoder.upsample_layers.0.0.conv.conv.weight"] == [channels, VAE, 7]
    for i, r in enumerate(ACO["decoder_ratios"], start=1):
        key = f"model.acoustic_tokenizer.decoder.upsample_layers.{i}.0.convtr.convtr.weight"
        assert shape[key] == [channels, channels // 2, 2 * r], key
        channels //= 2


def test_config_is_the_released_one_scaled_down():
    assert CFG["model_type"] == "vibevoice_streaming" and CFG["torch_dtype"] == "bfloat16"
    assert CFG["architectures"] == ["VibeVoiceStreamingForConditionalGenerationInference"]
    assert CFG["acoustic_vae_dim"] == VAE == HEAD["latent_size"] == HEAD["speech_vae_dim"]
    assert (DEC["model_type"], DEC["rope_theta"], DEC["rms_norm_eps"], DEC["max_position_embeddings"]) == \
        ("qwen2", 1e6, 1e-6, 8192)
    assert DEC.get("tie_word_embeddings", False) is False and DEC["rope_scaling"] is None
    assert ACO["decoder_depths"] is None and ACO["layernorm_eps"] == 1e-5 and ACO["causal"] is True
    assert (HEAD["prediction_type"], HEAD["ddpm_beta_schedule"], HEAD["ddpm_num_steps"]) == \
        ("v_prediction", "cosine", 1000)
    assert not (DATA / "model" / "generation_config.json").exists()
    assert GOLDEN["commit"].startswith("e73d1e1") and GOLDEN["transformers"] == "4.51.3"


def test_tokenizer_gives_the_recorded_ids():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(DATA / "tokenizer" / "tokenizer.json"))
    assert tok.token_to_id("<|image_pad|>") == GOLDEN["pad_id"] == tok.token_to_id("<|endoftext|>") + 12
    assert tok.encode(" \n", add_special_tokens=False).ids == [220, 198]
    assert GOLDEN["pad_id"] < DEC["vocab_size"]
    for name, run in GOLDEN["runs"].items():
        ids = _load(DATA / f"run_{name}.safetensors")["text_ids"].tolist()
        assert tok.encode(run["text"].strip() + "\n", add_special_tokens=False).ids == ids, name
    assert tok.encode(GOLDEN["voice"]["prompt_text"], add_special_tokens=False).ids == GOLDEN["voice"]["prompt_ids"]


def test_voice_preset_has_the_released_format():
    with zipfile.ZipFile(DATA / "voice.pt") as z:
        names = z.namelist()
        pkl = z.read(next(n for n in names if n.endswith("/data.pkl")))
    ops = list(pickletools.genops(pkl))
    assert ops[0][0].name == "PROTO" and ops[0][1] == 2
    globals_ = {arg for op, arg, _ in ops if op.name in ("GLOBAL", "STACK_GLOBAL", "INST", "OBJ")}
    assert globals_ == {"collections OrderedDict", "torch._utils _rebuild_tensor_v2", "torch BFloat16Storage",
                        "transformers.modeling_outputs BaseModelOutputWithPast",
                        "transformers.cache_utils DynamicCache"}
    storages = [n for n in names if re.search(r"/data/\d+$", n)]
    assert len(storages) == 4 + 2 * 2 * (LM_LAYERS + TTS_LAYERS)  # 4 hidden states + K and V of every layer

    bf16, fp32 = _load(DATA / "voice.safetensors"), _load(DATA / "voice_fp32.safetensors")
    for branch, layers, n in (("lm", LM_LAYERS, P), ("tts_lm", TTS_LAYERS, S), ("neg_lm", LM_LAYERS, 1),
                              ("neg_tts_lm", TTS_LAYERS, 1)):
        assert bf16[f"{branch}.last_hidden_state"].shape == (1, n, H)
        for i in range(layers):
            for kind in ("key", "value"):
                assert bf16[f"{branch}.{kind}.{i}"].shape == (1, KV, n, HEAD_DIM)
        assert f"{branch}.key.{layers}" not in bf16
    assert set(bf16) == set(fp32) - {"prompt_ids", "prompt_latents"}
    for key, value in bf16.items():
        np.testing.assert_array_equal(value, _to_bf16(fp32[key]), err_msg=key)
    assert fp32["prompt_ids"].tolist() == GOLDEN["voice"]["prompt_ids"] and fp32["prompt_latents"].shape == (K, VAE)


def test_components_have_the_config_shapes():
    c = _load(DATA / "components.safetensors")
    assert c["head.v"].shape == c["head.x"].shape == (4, VAE) and c["head.condition"].shape == (4, H)
    assert c["schedule5.timesteps"].tolist() == [999, 799, 599, 400, 200]  # realtime.md §4.4
    np.testing.assert_allclose(c["schedule5.sigmas"], [20291.30, 3.10373, 1.390751, 0.740281, 0.337461, 0],
                               rtol=1e-5)
    assert c["schedule10.timesteps"].shape == (10,) and c["schedule10.sigmas"][-1] == 0
    for name, steps in (("sample5", 5), ("sample10", 10)):
        assert c[f"{name}.x"].shape == c[f"{name}.v"].shape == (steps, VAE)
        np.testing.assert_array_equal(c[f"{name}.z"], c[f"{name}.x"][-1])
    assert c["decoder.one_shot"].shape == c["decoder.streamed"].shape == (3 * HOP,)
    one_shot = c["decoder.one_shot"]
    np.testing.assert_allclose(c["decoder.streamed"], one_shot, atol=1e-4 * abs(one_shot).max())  # observed 6.3e-5
    assert c["connector.out"].shape == (3, H) and c["classifier.logit"].shape == (3,)
    assert c["lower_lm.hidden_states"].shape == (LM_LAYERS + 1, 7, H)
    assert c["tts_lm.hidden_states"].shape == (TTS_LAYERS + 1, 7, H)
    np.testing.assert_array_equal(c["lower_lm.hidden_states"][-1], c["lower_lm.last_hidden_state"])  # no norm
    np.testing.assert_array_equal(c["lower_lm.hidden_states"][0], c["lower_lm.inputs_embeds"])


def _positions(run, n_ids):
    """realtime.md §4.7, computed independently of the recorded log: (stream, kind, positions) per forward."""
    out, pos, neg, f = [], S, 1, 0
    for w, size in enumerate(run["window_text_sizes"]):
        if size:
            first = 5 * w
            out.append(("lower_lm", "text", list(range(P + first, P + first + size))))
            out.append(("tts_pos", "text", list(range(pos, pos + size))))
            pos += size
        for _ in range(6):
            out += [("tts_pos", "speech", [pos]), ("tts_neg", "speech", [neg])]
            pos, neg, f = pos + 1, neg + 1, f + 1
    return out


@pytest.mark.parametrize("name", sorted(GOLDEN["runs"]))
def test_run_records_are_consistent(name):
    run, t = GOLDEN["runs"][name], _load(DATA / f"run_{name}.safetensors")
    voice, model = _load(DATA / "voice.safetensors"), _load(DATA / "model" / "model.safetensors")
    F, n, stop = run["frames_computed"], run["steps"], run["stop_frame"]
    ids = t["text_ids"].tolist()
    # window schedule: 5 ids per window, 6 frames per window, the stop inside the last computed window
    assert run["window_text_sizes"] == [len(ids[5 * w:5 * w + 5]) for w in range(run["windows"])]
    assert F == 6 * run["windows"] and stop // 6 == run["windows"] - 1 and run["frames_kept"] == stop + 1
    fed = sum(run["window_text_sizes"])
    for key, shape in (("noise", (F, VAE)), ("x", (F, n, VAE)), ("v", (F, n, VAE)), ("z", (F, VAE)),
                       ("decoder_in", (F, VAE)), ("audio_chunks", (F, HOP)), ("connector", (F, H)),
                       ("h_pos", (F, H)), ("h_neg", (F, H)), ("h_pos_after", (F, H)), ("h_neg_after", (F, H)),
                       ("eos_logit", (F,)), ("eos_prob", (F,)), ("text_lower_lm", (fed, H)),
                       ("text_tts_lm", (fed, H))):
        assert t[key].shape == shape, key
    np.testing.assert_array_equal(t["z"], t["x"][:, -1])
    scale, bias = model["model.speech_scaling_factor"], model["model.speech_bias_factor"]
    np.testing.assert_array_equal(t["decoder_in"], t["z"] / scale - bias)
    np.testing.assert_allclose(t["eos_prob"], 1 / (1 + np.exp(-t["eos_logit"].astype(np.float64))), atol=1e-6)
    # conditions (§4.4, pitfall 5): frame 0's negative is the preset's; each later one is the previous feed's output;
    # after a text window the positive is that window's last TTS-LM row
    np.testing.assert_array_equal(t["h_neg"][0], voice["neg_tts_lm.last_hidden_state"][0, -1])
    np.testing.assert_array_equal(t["h_neg"][1:], t["h_neg_after"][:-1])
    ends = np.cumsum(run["window_text_sizes"])
    for f in range(F):
        w = f // 6
        if f % 6 == 0 and run["window_text_sizes"][w]:
            np.testing.assert_array_equal(t["h_pos"][f], t["text_tts_lm"][ends[w] - 1], err_msg=f"frame {f}")
        else:
            np.testing.assert_array_equal(t["h_pos"][f], t["h_pos_after"][f - 1], err_msg=f"frame {f}")
    # positions of every forward (§4.7) and generate()'s sequences (§4.9)
    assert [(e["stream"], e["kind"], e["positions"]) for e in run["forwards"]] == _positions(run, len(ids))
    assert all(e["cache_position"] == e["positions"] and e["past"] == e["positions"][0] for e in run["forwards"])
    seq = [GOLDEN["pad_id"]] * S
    for w, size in enumerate(run["window_text_sizes"]):
        seq += ids[5 * w:5 * w + size] + [1] * 6
    assert t["sequences"].tolist() == seq
    # the audio is finite and of the tiny model's non-degenerate scale
    assert np.isfinite(t["audio_chunks"]).all() and 0.05 < abs(t["audio_chunks"]).max() < 10
