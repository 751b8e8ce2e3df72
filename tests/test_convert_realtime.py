"""`vibevoice-mlx convert` on the tiny VibeVoice-Realtime-0.5B model (tests/data/realtime_tiny): the converted
folders load and speak as Microsoft's code did (float32: the golden runs; float16: SNR against float32; -q 8 and
-q 4: both language models quantized, nothing else), refusals are one line with nothing written, and a hub repo
is converted once per revision into the cache."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner

import vibevoice_mlx as vv
from vibevoice_mlx.cli import main
from vibevoice_mlx.convert.cache import model_folder
from vibevoice_mlx.convert.convert import convert
from vibevoice_mlx.errors import UserError
from vibevoice_mlx.loader import inspect
from vibevoice_mlx.models.realtime import UNUSED_KEYS
from vibevoice_mlx.preset_store import PRESET_NAMES
from vibevoice_mlx.realtime_api import RealtimePipeline
from vibevoice_mlx.testing import (HUB_COMMIT, REALTIME_RUNS, REALTIME_TINY, assert_close, cache_repo, offline_hub,
                                   realtime_golden_run, realtime_tiny, snr_db)

SOURCE = REALTIME_TINY / "model"
TOKENIZER = REALTIME_TINY / "tokenizer"
ENCODER_KEY = "model.acoustic_tokenizer.encoder.downsample_layers.0.0.conv.conv.weight"
# Both LMs' Linear layers in the tiny config (2 lower layers, 3 TTS layers): what -q quantizes, and nothing else.
LM_LINEARS = {f"model.{lm}.layers.{i}.{m}" for lm, n in (("language_model", 2), ("tts_language_model", 3))
              for i in range(n) for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                          "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
# The tiny dims (hidden 64, MLP 64) take group size 64 (the default) and 32; 128 divides neither (refused below).
VARIANTS = {"float32": {"dtype": "float32"}, "float16": {"dtype": "float16"},
            "q8": {"dtype": "float32", "quantize": True, "q_bits": 8},
            "q4": {"dtype": "float32", "quantize": True, "q_bits": 4, "q_group_size": 32}}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("rt-converted")
    return {name: convert(str(SOURCE), root / name, tokenizer=str(TOKENIZER), **kw) for name, kw in VARIANTS.items()}


@pytest.fixture(scope="module")
def float32_runs(folders, tmp_path_factory):
    pipe, voice = realtime_tiny(tmp_path_factory.mktemp("voice"), folders["float32"])
    return {name: realtime_golden_run(pipe.model, voice, name) for name in REALTIME_RUNS}


def _source_keys() -> set:
    return set(mx.load(str(SOURCE / "model.safetensors")))


def _stored(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(mx.load(str(f)))
    return out


# --- the converted folders -----------------------------------------------------------------------------------


def test_the_folder_holds_every_model_tensor_and_the_unused_one_is_recorded(folders):
    folder = folders["float32"]
    stored = _stored(folder)
    assert set(stored) == _source_keys() - set(UNUSED_KEYS)  # strict: all of the model's, nothing more
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "vibevoice_streaming"
    assert config["tts_backbone_num_hidden_layers"] == 3
    assert set(config["conversion"]["dropped_tensors"]) == set(UNUSED_KEYS)
    assert config["conversion"]["source_layout"] == "realtime"
    assert "token_ids" not in config  # the 1.5B's control tokens mean nothing here
    assert json.loads((folder / "generation_config.json").read_text()) == {"steps": 5, "cfg_scale": 1.5}
    assert (folder / "preprocessor_config.json").read_bytes() == (SOURCE / "preprocessor_config.json").read_bytes()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        assert (folder / name).read_bytes() == (TOKENIZER / name).read_bytes()
    card = (folder / "README.md").read_text()
    assert "VibeVoice-Realtime-0.5B" in card and "`realtime`" in card and "5 diffusion steps, cfg scale 1.5" in card
    assert all(f"`{n}`" in card for n in PRESET_NAMES)
    assert UNUSED_KEYS[0] in card


def test_the_folder_loads_as_the_realtime_family(folders, capfd, caplog):
    ckpt, _, tok, tokens = inspect(folders["float32"])
    assert (ckpt.layout, ckpt.family, tokens) == ("mlx", "realtime", None)
    assert tok("hello world").input_ids == [256, 257, 78, 262, 260, 75, 67]  # the bundled tiny Qwen tokenizer
    pipe = vv.load(folders["float32"], dtype="float32")
    assert isinstance(pipe, RealtimePipeline) and pipe.defaults == {"steps": 5, "cfg_scale": 1.5}
    # transformers knows no vibevoice_streaming config: loading the tokenizer beside it says nothing about that.
    said = capfd.readouterr().err + caplog.text
    assert "vibevoice_streaming" not in said, said


def test_float16_keeps_the_policy_tensors_float32(folders):
    stored = _stored(folders["float16"])
    f32 = {k for k, v in stored.items() if v.dtype == mx.float32}
    assert f32 and all(k.startswith("model.speech_") or k.endswith(("gamma", "ffn_gamma")) for k in f32), f32
    assert {v.dtype for k, v in stored.items() if k not in f32} == {mx.float16}
    assert "model.speech_scaling_factor" in f32 and any(k.endswith("ffn_gamma") for k in f32)


@pytest.mark.parametrize("name", REALTIME_RUNS)
def test_float32_folder_matches_microsofts_runs(float32_runs, name):
    got, want, probs, want_probs = float32_runs[name]
    peak = float(np.abs(want).max())
    assert_close(f"converted {name} audio", got, want, atol=5e-4 * peak)  # the parity test's tolerance
    assert_close("EOS probabilities", probs, want_probs, atol=1e-5)


def test_float16_whole_runs_are_40_db_from_float32(folders, float32_runs, tmp_path):
    pipe, voice = realtime_tiny(tmp_path, folders["float16"], dtype="float16")
    assert pipe.dtype == mx.float16  # computed in float16, not upcast at load
    figures = {}
    for name in REALTIME_RUNS:
        got = realtime_golden_run(pipe.model, voice, name, dtype=mx.float16)[0]
        figures[name] = snr_db(got, float32_runs[name][0])
    report = ", ".join(f"{n} {db:.1f} dB" for n, db in figures.items())
    print(f"[float16 vs float32 SNR] {report}")
    # observed (MLX CPU): demo 51.2 dB, multiple5 52.8 dB, midwindow 52.5 dB
    assert min(figures.values()) >= 40.0, f"float16 whole-run SNR against float32: {report} (needs >= 40 dB)"


@pytest.mark.parametrize("variant,bits,group", [("q8", 8, 64), ("q4", 4, 32)])
def test_quantize_both_language_models_only(folders, variant, bits, group, tmp_path):
    folder = folders[variant]
    stored = _stored(folder)
    assert {k.rsplit(".", 1)[0] for k in stored if k.endswith(".scales")} == LM_LINEARS
    assert json.loads((folder / "config.json").read_text())["quantization"] == {"group_size": group, "bits": bits}
    assert f"{bits}-bit language models (group size {group})" in (folder / "README.md").read_text()
    pipe, voice = realtime_tiny(tmp_path, folder)
    quantized = {p for p, m in pipe.model.named_modules() if isinstance(m, nn.QuantizedLinear)}
    assert quantized == LM_LINEARS
    got, want = realtime_golden_run(pipe.model, voice, "demo")[:2]  # runs to the forced stop; finite audio
    assert got.shape == want.shape and np.isfinite(got).all()


def test_cli_converts_with_q8(tmp_path):
    out = tmp_path / "q8"
    r = CliRunner().invoke(main, ["convert", "--model", str(SOURCE), "--tokenizer", str(TOKENIZER),
                                  "--mlx-path", str(out), "-q", "--q-bits", "8"])
    assert r.exit_code == 0, r.output
    assert isinstance(vv.load(out, dtype="float32"), RealtimePipeline)


# --- refusals: one line, nothing written ------------------------------------------------------------------------


def _edited(dst: Path, edit=None, config=None) -> Path:
    shutil.copytree(SOURCE, dst)
    if edit is not None:
        tensors = dict(mx.load(str(dst / "model.safetensors")))
        edit(tensors)
        mx.save_safetensors(str(dst / "model.safetensors"), tensors, metadata={"format": "pt"})
    if config is not None:
        raw = json.loads((dst / "config.json").read_text())
        config(raw)
        (dst / "config.json").write_text(json.dumps(raw))
    return dst


def _pt_only(dst: Path) -> None:
    (dst / "model.safetensors").unlink()
    shutil.copyfile(REALTIME_TINY / "voice.pt", dst / "en-Carter_man.pt")  # a voice preset, not weights


REFUSALS = {
    "missing tensor": (dict(edit=lambda t: t.pop("tts_eos_classifier.fc2.bias")), {},
                       ["missing 1 tensor(s): tts_eos_classifier.fc2.bias"]),
    "extra tensor": (dict(edit=lambda t: t.update({"model.mystery.weight": mx.zeros((2,))})), {},
                     ["unexpected 1 tensor(s): model.mystery.weight"]),
    "encoder tensor": (dict(edit=lambda t: t.update({ENCODER_KEY: mx.zeros((4, 1, 7))})), {},
                       [ENCODER_KEY, "no encoder"]),
    "wrong shape": (dict(edit=lambda t: t.update({"model.tts_input_types.weight": mx.zeros((3, 64))})), {},
                    ["wrong shape", "model.tts_input_types.weight (3, 64)"]),
    "unknown model_type": (dict(config=lambda c: c.update(model_type="vibevoice_streaming_v2")), {},
                           ["'vibevoice_streaming_v2'", "not a VibeVoice checkpoint"]),
    "bad TTS layer count": (dict(config=lambda c: c.update(tts_backbone_num_hidden_layers=5)), {},
                            ["tts_backbone_num_hidden_layers 5"]),
    "pt files only": (dict(), {"allow_pickle": True}, ["no *.safetensors", "voice presets"]),
    "group size dividing nothing": (dict(), {"quantize": True, "q_group_size": 128},
                                    ["not a multiple of --q-group-size 128"]),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_are_one_line_and_write_nothing(case, tmp_path):
    source_edit, options, words = REFUSALS[case]
    src = _edited(tmp_path / "src", **source_edit)
    if case == "pt files only":
        _pt_only(src)
    out = tmp_path / "out"
    with pytest.raises(UserError) as e:
        convert(str(src), out, tokenizer=str(TOKENIZER), **options)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no temporary folder left


def test_cli_refusal_is_one_error_line(tmp_path):
    src = _edited(tmp_path / "src", edit=lambda t: t.update({ENCODER_KEY: mx.zeros((4, 1, 7))}))
    r = CliRunner().invoke(main, ["convert", "--model", str(src), "--tokenizer", str(TOKENIZER),
                                  "--mlx-path", str(tmp_path / "out")])
    assert r.exit_code != 0 and "Traceback" not in r.output, r.output
    assert [ln for ln in r.output.splitlines() if ln.startswith("Error:")] == [r.output.strip()], r.output
    assert not (tmp_path / "out").exists()


# --- the tokenizer and the hub cache -----------------------------------------------------------------------------


def _hub(monkeypatch, tmp_path, with_tokenizer=True) -> Path:
    """An offline hub cache holding the tiny model as microsoft/VibeVoice-Realtime-0.5B and, if asked, the tiny
    tokenizer as the Qwen repo its preprocessor_config.json names."""
    cache = tmp_path / "hf-cache"
    offline_hub(monkeypatch, cache)
    cache_repo(cache, "microsoft/VibeVoice-Realtime-0.5B", SOURCE)
    qwen = json.loads((SOURCE / "preprocessor_config.json").read_text())["language_model_pretrained_name"]
    if with_tokenizer:
        cache_repo(cache, qwen, TOKENIZER)
    return cache


def test_the_tokenizer_comes_from_the_repo_the_preprocessor_config_names(tmp_path, monkeypatch):
    _hub(monkeypatch, tmp_path)
    out = convert("microsoft/VibeVoice-Realtime-0.5B", tmp_path / "out", dtype="float32")
    assert (out / "tokenizer.json").read_bytes() == (TOKENIZER / "tokenizer.json").read_bytes()
    assert json.loads((out / "config.json").read_text())["conversion"]["revision"] == HUB_COMMIT


def test_no_tokenizer_offline_is_one_line(tmp_path, monkeypatch):
    _hub(monkeypatch, tmp_path, with_tokenizer=False)
    with pytest.raises(UserError) as e:
        convert("microsoft/VibeVoice-Realtime-0.5B", tmp_path / "out")
    assert "\n" not in str(e.value) and "--tokenizer" in str(e.value), str(e.value)
    assert not (tmp_path / "out").exists()


def test_a_hub_repo_is_converted_once_per_revision_into_the_cache(tmp_path, monkeypatch):
    cache = _hub(monkeypatch, tmp_path)
    monkeypatch.setenv("VIBEVOICE_MLX_CACHE", str(tmp_path / "vv-cache"))
    import vibevoice_mlx.convert.convert as conv

    conversions, real = [], conv.convert
    monkeypatch.setattr(conv, "convert", lambda *a, **k: conversions.append(a) or real(*a, **k))
    repo = "microsoft/VibeVoice-Realtime-0.5B"
    first = model_folder(repo, dtype="float32")
    assert model_folder(repo, dtype="float32") == first and len(conversions) == 1
    assert Path(first).name == f"microsoft--VibeVoice-Realtime-0.5B--{HUB_COMMIT[:12]}--float32"
    pipe = vv.load(first, dtype="float32")
    assert isinstance(pipe, RealtimePipeline)
    # The repo moves to a new revision: converted again, beside the old one.
    new = "fedcba9876543210fedcba9876543210fedcba98"
    root = cache / "models--microsoft--VibeVoice-Realtime-0.5B"
    shutil.copytree(root / "snapshots" / HUB_COMMIT, root / "snapshots" / new)
    (root / "refs" / "main").write_text(new)
    second = model_folder(repo, dtype="float32")
    assert second != first and Path(second).name.endswith(f"--{new[:12]}--float32") and len(conversions) == 2


# --- the release's 605 tensors --------------------------------------------------------------------------------


def _release_config() -> dict:
    """The tiny config scaled to the release's sizes (realtime.md §1: hidden 896, 24 layers of which 20 TTS, ...)."""
    raw = json.loads((SOURCE / "config.json").read_text())
    raw["decoder_config"].update(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                                 num_key_value_heads=2, vocab_size=151936, max_window_layers=24)
    raw["acoustic_tokenizer_config"].update(vae_dim=64, encoder_n_filters=32, decoder_n_filters=32,
                                            encoder_depths="3-3-3-3-3-3-8")
    raw["diffusion_head_config"].update(hidden_size=896, head_layers=4, head_ffn_ratio=3.0, latent_size=64,
                                        speech_vae_dim=64)
    raw.update(tts_backbone_num_hidden_layers=20, acoustic_vae_dim=64)
    return raw


def test_the_released_605_tensors_are_exactly_what_convert_checks():
    """The released key table (tests/data/realtime_tiny/weight-keys-realtime-0.5b.tsv.gz) as lazy zeros through
    convert's own model, sanitize and strict check: all 605 accepted, the unused one dropped, nothing missing.
    Lazy arrays: nothing of the 2 GB is allocated."""
    import gzip

    from vibevoice_mlx.checkpoint import REALTIME, check_weights
    from vibevoice_mlx.convert.convert import _family_model

    with gzip.open(REALTIME_TINY / "weight-keys-realtime-0.5b.tsv.gz", "rt") as f:
        rows = [ln.rstrip("\n").split("\t") for ln in f if not ln.startswith(("#", "original_key"))]
    table = {key: mx.zeros(json.loads(shape), dtype=mx.bfloat16) for key, _, shape, _ in rows}
    assert len(table) == 605
    _, model = _family_model(_release_config(), REALTIME, TOKENIZER)
    weights = model.sanitize(table, REALTIME)
    assert set(table) - set(weights) == set(UNUSED_KEYS)
    check_weights(model, weights)  # every one of the model's tensors, with its shape; nothing extra
    # The release's dims take -q's default group size (64) in both language models.
    linears = [m for p, m in model.named_modules() if model.quant_predicate(p, m)]
    assert len(linears) == 24 * 7 and all(m.weight.shape[-1] % 64 == 0 for m in linears)
