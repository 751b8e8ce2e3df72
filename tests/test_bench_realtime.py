"""`vibevoice-mlx bench` for VibeVoice-Realtime-0.5B on the tiny realtime model (tests/data/realtime_tiny): what
it reports and how the figures hang together (not how fast anything is), the floor of realtime.md §7.2, and the
random full-size checkpoint's key structure."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import vibevoice_mlx as vv
from vibevoice_mlx import bench_realtime, bench_report, fixtures_realtime
from vibevoice_mlx.cli import main

DATA = Path(__file__).parent / "data" / "realtime_tiny"


@pytest.fixture(scope="module")
def rt_pipe():
    return vv.load(DATA / "model", dtype="float32", tokenizer=DATA / "tokenizer")


@pytest.fixture(scope="module")
def rt_voice(tmp_path_factory):
    """The tiny model's preset, converted as a user's `.pt` is."""
    from vibevoice_mlx.presets import convert_pt

    path = tmp_path_factory.mktemp("voice") / "voice.safetensors"
    convert_pt(DATA / "voice.pt", path)
    return path


def test_stream_generate_yields_each_frame_before_computing_the_next(rt_pipe, rt_voice):
    """The first audio goes out as soon as frame 0 is decoded: before its feedback forwards and EOS decision
    (which `eos_rule` sees), not a frame later."""
    seen = []

    def rule(frame, probability):
        seen.append(frame)
        return frame >= 2

    stream = vv.stream_generate(rt_pipe, "Hello there.", str(rt_voice), eos_rule=rule)
    first = next(stream)
    assert first.audio.size == rt_pipe.hop_length and first.frames == 1 and not first.finished
    assert seen == []  # frame 0's stop decision has not been taken yet
    rest = list(stream)
    assert [r.frames for r in rest] == [2, 3, 3] and seen == [0, 1, 2]
    assert rest[-1].finished and rest[-1].audio.size == 0 and not any(r.finished for r in rest[:-1])


# --- bench on the tiny realtime model ---------------------------------------------------------------------------

VARIANTS = ["mlx", "mlx-fp16", "mlx-q8"]
STAGES = ["diffusion head", "decoder", "TTS LM feeds + EOS", "text window"]


def _bench(voice, *args):
    r = CliRunner().invoke(main, ["bench", "--model", str(DATA / "model"), "--tokenizer", str(DATA / "tokenizer"),
                                  "--voice", str(voice), "--frames", "3", "--runs", "2", "--profile-frames", "7",
                                  *args])
    assert r.exit_code == 0, r.output
    return r


@pytest.fixture(scope="module")
def doc(rt_voice):
    r = _bench(rt_voice, "--json")
    return json.loads(r.stdout[r.stdout.index("{"):])


def test_json_has_every_figure_of_each_variant(doc, rt_pipe):
    assert doc["family"] == "realtime" and doc["bandwidth"]["gb_per_s"] > 0 and doc["blas"]
    assert doc["settings"]["steps"] == 5 and doc["settings"]["cfg_scale"] == 1.5  # the realtime defaults
    assert [r["label"] for r in doc["systems"]] == VARIANTS
    assert [r["dtype"] for r in doc["systems"]] == ["float32", "float16", "float32"]
    frame_s = rt_pipe.hop_length / 24000
    for r in doc["systems"]:
        assert r["frames_timed"] == 3 * 2 and len(r["frame_ms_runs"]) == 2 and len(r["first_audio_runs_s"]) == 2
        assert r["frame_ms"] > 0 and r["real_time"] == pytest.approx(frame_s / (r["mean_frame_ms"] / 1e3))
        assert 0 < r["first_audio_s"] and r["load_s"] > 0 and r["peak_process_gb"] > 0 and r["peak_mlx_gb"] > 0
        assert sorted(r["stages_ms"]) == sorted(STAGES) and all(v > 0 for v in r["stages_ms"].values())
        fl = r["floor_ms"]
        assert fl["frame"] == pytest.approx(sum(fl[k] for k in STAGES[:3]))
        assert fl["frame"] == pytest.approx(sum(r["bytes"]["frame"].values()) / doc["bandwidth"]["gb_per_s"] / 1e6)
        assert r["text_ids"] == len(rt_pipe.tokenizer.encode(doc["settings"]["script"].strip() + "\n"))
    f32, f16, q8 = doc["systems"]
    assert f16["weights_bytes"] < f32["weights_bytes"] and q8["weights_bytes"] < f32["weights_bytes"]
    assert q8["bytes"]["frame"]["TTS LM feeds + EOS"] < f32["bytes"]["frame"]["TTS LM feeds + EOS"]
    assert q8["bytes"]["frame"]["decoder"] == f32["bytes"]["frame"]["decoder"]  # only the LMs are quantized
    t = doc["targets"]
    assert set(t) == {"frame_vs_floor", "first_audio"}  # no peer in this run
    assert t["frame_vs_floor"]["value"] == pytest.approx(f32["frame_ms"] / f32["floor_ms"]["frame"])
    assert t["first_audio"]["target"] == pytest.approx((f32["stages_ms"]["text window"] + f32["frame_ms"]) / 1e3)
    chips = {(p["chip"], p["weights"]) for p in doc["apple_prediction"]}
    assert chips == {(c, w) for c in bench_realtime.APPLE_CHIPS for w in ("float16", "8-bit LMs")}


def test_text_report_prints_every_figure(rt_voice):
    out = _bench(rt_voice, "--dtype", "float32").stdout
    rows = [line for line in out.splitlines() if "ms/frame (median of 6)" in line]
    assert [line.split()[0] for line in rows] == ["mlx"]  # --dtype: that dtype alone
    for figure in ("ms/frame with the text windows", "x real time", "first audio", "load"):
        assert figure in rows[0]
    for stage in STAGES:
        assert f"            {stage} " in out, stage
    assert "memory read bandwidth:" in out and "peak memory:" in out and "floor:" in out
    assert "target: per frame / floor (float32):" in out and "target: first audio vs" in out
    assert "prediction from the floor, not measured" in out and "M4 Max" in out


def test_a_realtime_model_without_a_voice_is_refused_before_anything_is_measured(monkeypatch):
    def measured():
        raise AssertionError("the bandwidth was measured before the voice was checked")

    monkeypatch.setattr(bench_report, "read_bandwidth", measured)
    r = CliRunner().invoke(main, ["bench", "--model", str(DATA / "model"), "--tokenizer", str(DATA / "tokenizer")])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1 and "--voice" in r.output, r.output


def test_options_of_the_other_family_are_one_line_errors(rt_voice, monkeypatch):
    def measured():
        raise AssertionError("the bandwidth was measured before the options were checked")

    monkeypatch.setattr(bench_report, "read_bandwidth", measured)
    base = ["bench", "--model", str(DATA / "model"), "--tokenizer", str(DATA / "tokenizer"), "--voice", str(rt_voice)]
    for extra, flag in ((["--compare", "torch"], "--compare torch"), (["--batch", "1,2"], "--batch"),
                        (["--backends", "torch"], "--backends")):
        r = CliRunner().invoke(main, base + extra)
        assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1 and flag in r.output, r.output


def test_a_voice_preset_for_a_1_5b_model_is_refused(tiny, rt_voice):
    r = CliRunner().invoke(main, ["bench", "--model", str(tiny["original"]), "--voice", str(rt_voice)])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1 and "--voice" in r.output, r.output


# --- the floor (realtime.md §7.1, §7.2) -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_model():
    """The released configuration, never evaluated: the floor needs shapes and dtypes only."""
    from vibevoice_mlx.models.realtime import RealtimeConfig, RealtimeModel

    return RealtimeModel(RealtimeConfig.from_dict(fixtures_realtime.realtime_config()))


def test_floor_matches_realtime_md(real_model):
    fp16 = bench_realtime.floor_bytes(real_model, 5, itemsize=2)
    frame = sum(fp16["frame"].values())
    assert frame == 2 * (298_248_576 + 157_140_480 + 343_695_969 + 1_667_457)  # §7.1: 1.602 GB optimized
    assert round(frame / 1e9, 3) == 1.602
    assert fp16["frame"]["diffusion head"] == 2 * 157_140_480
    assert fp16["text_window"] == 2 * (59_649_536 + 298_248_576 + 5 * 896)  # 0.716 GB, 5 embedding rows
    assert round(sum(bench_realtime.floor_bytes(real_model, 5, itemsize=4)["frame"].values()) / 1e9, 3) == 3.203
    for steps, gb in ((10, 1.892), (20, 2.472)):
        assert round(sum(bench_realtime.floor_bytes(real_model, steps, itemsize=2)["frame"].values()) / 1e9, 3) == gb
    ms = bench_realtime.floor_ms(fp16, 100)  # §7.2's 100 GB/s row, and §7.3's first audio
    assert [round(ms[k], 1) for k in ("frame", "text_window", "window", "first_audio")] == [16.0, 7.2, 103.2, 17.2]
    # the KV cache: 10 KiB per position of the TTS LM in fp16 (20 layers x K,V x 2 heads x 64)
    more = bench_realtime.floor_bytes(real_model, 5, context=100, neg_context=1, itemsize=2)
    assert sum(more["frame"].values()) - frame == 101 * 20 * 2 * 2 * 64 * 2


# --- the random full-size checkpoint ----------------------------------------------------------------------------


def test_random_checkpoint_has_the_released_keys_and_shapes():
    with gzip.open(DATA / "weight-keys-realtime-0.5b.tsv.gz", "rt") as f:
        rows = [line.rstrip("\n").split("\t") for line in f if not line.startswith(("#", "original_key"))]
    want = {key: tuple(json.loads(shape)) for key, _, shape, _ in rows}
    specs = fixtures_realtime.tensor_specs(fixtures_realtime.realtime_config())
    assert len(specs) == len(want) == 605 and dict(specs) == want
    assert fixtures_realtime.parameter_count(specs) == 1_017_626_724  # realtime.md §1.3


@pytest.mark.needs_torch
def test_random_checkpoint_builds_and_loads_at_a_small_size(tmp_path):
    """The same builder at the tiny model's config: a strict load, a preset of the model's shape, a tokenizer."""
    from vibevoice_mlx.preset_store import load_voice_preset
    from vibevoice_mlx.presets import PresetShape

    config = json.loads((DATA / "model" / "config.json").read_text())
    out = fixtures_realtime.build(tmp_path, config=config)
    pipe = vv.load(out["model"], dtype="float32", tokenizer=out["tokenizer"])
    voice = load_voice_preset(out["voice"], shape=PresetShape.from_config(pipe.config.raw))
    assert (voice.prompt_length, voice.tts_length) == fixtures_realtime.PRESET_LENGTHS
    audio = [r.audio for r in vv.stream_generate(pipe, "Hi.", str(out["voice"]), eos_rule=lambda f, p: f >= 1)]
    assert sum(a.size for a in audio) == 2 * pipe.hop_length and all(np.isfinite(a).all() for a in audio)
    assert float(np.abs(np.concatenate(audio)).max()) > 1e-3  # not silent: the scales are non-degenerate


def test_random_weights_are_built_once_into_the_cache(tmp_path, monkeypatch):
    calls = []

    def fake_build(out):
        calls.append(out)
        (out / "model").mkdir(parents=True)

    monkeypatch.setattr("vibevoice_mlx.fixtures_realtime.build", fake_build)
    first = bench_realtime.random_weights(root=tmp_path)
    assert bench_realtime.random_weights(root=tmp_path) == first and len(calls) == 1
    assert first["model"] == tmp_path / "random-weights" / "realtime-0.5b-bfloat16-seed0" / "model"


# --- the mlx-audio peer's voice ---------------------------------------------------------------------------------


def test_mlx_audio_voice_cache_holds_our_preset(rt_voice, tmp_path):
    """mlx-audio's voice-cache layout (its `load_voice`): per-layer [1, kv_heads, seq, head_dim] and the hidden
    states whose last row it reads."""
    import mlx.core as mx

    from vibevoice_mlx.bench_peers import _mlx_audio_voice

    target = tmp_path / "voices" / "bench.safetensors"
    _mlx_audio_voice(str(rt_voice), target)
    got, ours = mx.load(str(target)), mx.load(str(rt_voice))
    for branch in ("lm", "tts_lm", "neg_tts_lm"):
        keys = ours[f"{branch}.keys"]
        for i in range(keys.shape[0]):
            assert mx.array_equal(got[f"{branch}_key_{i}"], keys[i][None])
            assert mx.array_equal(got[f"{branch}_value_{i}"], ours[f"{branch}.values"][i][None])
    assert mx.array_equal(got["neg_tts_lm_hidden"].reshape(-1), ours["neg_tts_lm.hidden"])
    assert got["tts_lm_hidden"].shape[1] == ours["tts_lm.keys"].shape[2]
