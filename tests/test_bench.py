"""`vibevoice-mlx bench` on the tiny model: what it reports and how the figures hang together (not how fast
anything is), and the engine pieces it measures: the stage profile, the decode layout, the queued LM step."""

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

import vibevoice_mlx as vv
from vibevoice_mlx import backbone, bench, bench_report
from vibevoice_mlx.backend import FrameSettings
from vibevoice_mlx.cli import main
from vibevoice_mlx.errors import UserError

STAGES = ["language model", "diffusion head", "decoder", "semantic encoder", "connectors"]


def _bench(tiny, *args):
    r = CliRunner().invoke(main, ["bench", "--model", str(tiny["original"]), "--tokenizer", str(tiny["tokenizer"]),
                                  "--force-frames", "--frames", "3", "--runs", "2", "--voice-seconds", "0.5",
                                  "--profile-frames", "3", *args])
    assert r.exit_code == 0, r.output
    return r


def _nbytes(module):
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


@pytest.fixture(scope="module")
def doc(tiny):
    r = _bench(tiny, "--batch", "1,2", "--q-bits", "8", "--json")
    return json.loads(r.stdout[r.stdout.index("{"):])


def test_json_has_every_figure_of_each_run(doc, pipe):
    assert doc["frame_seconds"] == pipe.hop_length / 24000
    mlx, q8 = doc["systems"]
    assert [mlx["label"], q8["label"]] == ["mlx", "mlx-q8"]
    for r in (mlx, q8):
        assert r["frames_timed"] == 3 * 2 and len(r["frame_ms_runs"]) == 2
        assert r["frame_ms"] > 0 and r["real_time"] == pytest.approx(doc["frame_seconds"] / (r["frame_ms"] / 1e3))
        # the first audio comes after the first token choice, which ends the prefill
        assert 0 < r["prefill_s"] < r["first_audio_s"]
        assert r["load_s"] > 0 and r["peak_process_gb"] > 0 and r["dtype"] == "float32" and r["device"] == "CPU"
        assert sorted(r["stages_ms"]) == sorted(STAGES + ["token choice"])
        assert all(v > 0 for v in r["stages_ms"].values())
        assert set(r["prefill_stages_s"]) == {"voice encoder", "language model"}
    assert q8["memory"]["weights"] < mlx["memory"]["weights"]  # the quantized layers are smaller
    assert doc["bandwidth"]["gb_per_s"] > 0 and doc["blas"] and doc["settings"]["frames"] == 3


def test_floor_counts_the_bytes_each_stage_reads(doc, tiny):
    from vibevoice_mlx.loader import load_model

    model, _ = load_model(tiny["original"], dtype="float32")
    m = model.model
    per_frame = doc["bytes_per_frame"]
    assert per_frame["decoder"] == _nbytes(m.acoustic_tokenizer.decoder)
    assert per_frame["semantic encoder"] == _nbytes(m.semantic_tokenizer.encoder)
    assert per_frame["connectors"] == _nbytes(m.acoustic_connector) + _nbytes(m.semantic_connector)
    assert doc["systems"][0]["memory"]["weights"] == _nbytes(model)
    # each diffusion step reads the FFNs, the norms, the input projection and the final linear again
    head = m.prediction_head
    per_step = sum(_nbytes(layer.ffn) + _nbytes(layer.norm) for layer in head.layers)
    per_step += _nbytes(head.noisy_images_proj) + _nbytes(head.final_layer.linear)
    ten, twenty = (bench_report.frame_bytes(model, n, 50)["diffusion head"] for n in (10, 20))
    assert twenty - ten == 10 * per_step
    # the language model: its layers and final norm once (not the embeddings), 4 head rows, the KV cache read
    lm = m.language_model
    a, b = (bench_report.frame_bytes(model, 10, c)["language model"] for c in (50, 51))
    assert a - (_nbytes(lm) - _nbytes(lm.embed_tokens)) - 4 * model.config.hidden_size * 4 == 50 * (b - a)
    assert bench_report.frame_bytes(model, 10, 50, itemsize=2)["decoder"] < per_frame["decoder"]


def test_batch_rows_and_apple_predictions(doc):
    rows = doc["batch"]
    assert [r["batch"] for r in rows] == [1, 2]
    for r in rows:
        assert r["frames_per_s"] == pytest.approx(r["batch"] / (r["step_ms"] / 1e3))
    bytes_f16 = sum(doc["bytes_per_frame_float16"].values())
    for b, preds in doc["apple_prediction"].items():
        m4 = next(p for p in preds if p["chip"] == "M4 Max")
        assert m4["frames_per_s"] == pytest.approx(int(b) * 546e9 / bytes_f16)


@pytest.mark.needs_torch
def test_text_report_with_transformers_beside_it(tiny):
    r = _bench(tiny, "--compare", "torch", "--torch-model", str(tiny["transformers"]))
    out = r.stdout
    for stage in STAGES:
        assert f"        {stage} " in out, stage
    assert "floor:" in out and "memory read bandwidth:" in out
    rows = {line.split()[0]: line for line in out.splitlines() if " ms/frame (median of 6)" in line}
    assert set(rows) == {"mlx", "transformers"}
    import re

    assert re.search(r"^mlx / transformers speed per frame: [\d.]+x$", out, re.M)


def test_bandwidth_is_read_by_every_core_in_a_quiet_process(monkeypatch):
    # What the reading is made of, not how fast it is (a timed comparison fails on a busy machine): a fresh process
    # with no preloaded BLAS and every BLAS on one thread, one reader per core.
    seen = {}
    run = bench_report.subprocess.run

    def spy(cmd, env, **kwargs):
        seen.update(cmd=cmd, env=env)
        return run(cmd, env=env, **kwargs)

    monkeypatch.setattr(bench_report.subprocess, "run", spy)
    monkeypatch.setenv("LD_PRELOAD", "")
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    r = bench_report.read_bandwidth(gib=0.125, repeats=3)
    assert r["gb_per_s"] > 0 and f"{bench_report._cores()} threads in a fresh process" in r["how"]
    assert "LD_PRELOAD" not in seen["env"]
    assert all(seen["env"][k] == "1" for k in bench_report.BLAS_THREADS_ENV)
    assert seen["cmd"][-2] == str(bench_report._cores())


def test_bandwidth_is_read_here_when_no_fresh_process_starts(monkeypatch, caplog):
    monkeypatch.setattr(bench_report.sys, "executable", "/nonexistent/python")
    r = bench_report.read_bandwidth(gib=0.125, repeats=2)
    assert r["gb_per_s"] > 0 and "threads in this process" in r["how"]
    assert any("in a fresh process failed" in m for m in caplog.messages)


def test_a_time_below_its_floor_says_the_floor_is_unreliable():
    nbytes = dict.fromkeys(STAGES, 10**9)  # 1 GB a stage: 100 ms at 10 GB/s, 500 ms a frame
    floor = {"bandwidth_gb_per_s": 10.0, "bytes_per_frame": nbytes}
    fast = {"frame_ms": 400.0, "stages_ms": dict(zip(STAGES, [80.0, 150.0, 100.0, 100.0, 100.0]))}
    line = bench_report.format_floor(fast, floor)[0]
    assert "achieved 0.80x the floor: below 1.0x, so the floor is unreliable" in line, line
    stages = bench_report.format_stages(fast, floor)
    marked = [x.split()[0] for x in stages if x.endswith(bench_report.BELOW_FLOOR_MARK)]
    assert marked == ["language"] and stages[-1].endswith(bench_report.UNRELIABLE), stages
    slow = dict(fast, frame_ms=600.0, stages_ms=dict.fromkeys(STAGES, 120.0))
    text = "\n".join(bench_report.format_floor(slow, floor) + bench_report.format_stages(slow, floor))
    assert "achieved 1.20x the floor" in text and "unreliable" not in text and "(!)" not in text


def test_bad_arguments_are_one_line_errors(tiny):
    r = CliRunner().invoke(main, ["bench"])
    assert r.exit_code != 0 and "--random-weights" in r.output
    r = CliRunner().invoke(main, ["bench", "--model", str(tiny["original"]), "--compare", "onnx"])
    assert r.exit_code != 0 and "Unknown peer" in r.output
    r = CliRunner().invoke(main, ["bench", "--model", str(tiny["original"]), "--batch", "two"])
    assert r.exit_code != 0 and "comma-separated" in r.output


def test_a_missing_model_is_refused_before_anything_is_measured(tmp_path, monkeypatch):
    def measured():
        raise AssertionError("the bandwidth was measured before the model folder was checked")

    monkeypatch.setattr(bench_report, "read_bandwidth", measured)
    r = CliRunner().invoke(main, ["bench", "--model", str(tmp_path / "nope")])
    want = f"Error: No such folder: {tmp_path / 'nope'} (and it is not a Hugging Face repo id like 'owner/name')."
    assert r.exit_code == 1 and r.output.strip().splitlines() == [want], r.output


def test_compare_torch_without_a_transformers_folder_is_refused_before_anything_is_measured(tiny, monkeypatch):
    def measured():
        raise AssertionError("the bandwidth was measured before --compare torch was checked")

    monkeypatch.setattr(bench_report, "read_bandwidth", measured)
    r = CliRunner().invoke(main, ["bench", "--model", str(tiny["original"]), "--compare", "torch"])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert r.output.strip().splitlines()[-1].startswith("Error: --compare torch times transformers"), r.output


def test_a_peer_python_that_cannot_run_mlx_audio_is_refused_before_any_timing(tiny, tmp_path):
    from vibevoice_mlx.bench_peers import check_peer_python

    fails, works = tmp_path / "no-mlx-audio", tmp_path / "has-mlx-audio"
    fails.write_text("#!/bin/sh\nexit 1\n")
    works.write_text("#!/bin/sh\nexit 0\n")
    for f in (fails, works):
        f.chmod(0o755)
    assert "cannot import mlx_audio" in check_peer_python(str(fails))
    assert check_peer_python(str(works)) is None
    missing = str(tmp_path / "nowhere" / "python")
    assert "cannot run it" in check_peer_python(missing)
    r = CliRunner().invoke(main, ["bench", "--model", str(tiny["original"]), "--compare", "mlx-audio",
                                  "--peer-python", missing])
    assert r.exit_code == 1 and r.output.strip().splitlines() == [f"Error: {check_peer_python(missing)}"]


def test_random_weights_are_built_once_into_the_cache(tmp_path, monkeypatch):
    calls = []

    def fake_build(out, size, layouts, seed, dtype):
        calls.append((size, tuple(layouts), dtype))
        for name in (*layouts, "tokenizer"):
            (out / name).mkdir(parents=True)

    monkeypatch.setattr("vibevoice_mlx.fixtures.build", fake_build)
    first = bench.random_weights("1.5b", root=tmp_path)
    again = bench.random_weights("1.5b", root=tmp_path)
    assert first == again and calls == [("1.5b", ("original", "transformers"), "bfloat16")]
    assert first["original"] == tmp_path / "random-weights" / "1.5b-bfloat16-seed0" / "original"
    with pytest.raises(UserError, match="1.5b, 7b"):
        bench.random_weights("3b", root=tmp_path)


# --- the engine pieces bench measures ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe(tiny):
    return vv.load(tiny["original"], tokenizer=tiny["tokenizer"], dtype="float32")


def test_profile_gives_the_outputs_of_a_plain_frame_step(pipe):
    backend = pipe.backend
    step = backend.frame_step(FrameSettings(10, 1.3))
    m = backend.model.model
    h, latent = pipe.config.hidden_size, pipe.config.acoustic_vae_dim
    args = (mx.random.normal((2, h), key=mx.random.key(1)), mx.random.normal((2, h), key=mx.random.key(2)),
            mx.random.normal((2, latent), key=mx.random.key(3)),
            m.acoustic_tokenizer.decoder.make_state(2), m.semantic_tokenizer.encoder.make_state(2))
    plain = step(*args, 10, 1.3)
    profiled, seconds = step.profile(*args, 10, 1.3)
    assert list(seconds) == ["diffusion head", "decoder", "semantic encoder", "connectors"]
    for a, b in zip(tree_flatten(plain), tree_flatten(profiled)):
        np.testing.assert_allclose(np.array(b[1]), np.array(a[1]), atol=1e-5 * max(1, float(mx.abs(a[1]).max())))


def test_decode_layout_is_on_for_the_cpu_and_changes_only_rounding(tiny, pipe):
    from vibevoice_mlx.engine import MLXBackend
    from vibevoice_mlx.loader import VibeVoice, load_model

    layer = pipe.model.model.language_model.layers[0]
    assert isinstance(layer.mlp.gate_proj, backbone.DecodeLinear)
    assert isinstance(pipe.model.model.acoustic_tokenizer.decoder.stages[0][0].ffn.linear1, backbone.DecodeLinear)
    assert not isinstance(pipe.model.model.acoustic_tokenizer.encoder.stages[0][0].ffn.linear1,
                          backbone.DecodeLinear)  # the voice encoder runs at prefill only: left as loaded
    model, _ = load_model(tiny["original"], dtype="float32")
    plain = VibeVoice(backend=MLXBackend(model, pipe.tokens, decode_layout=False), tokenizer=pipe.tokenizer,
                      tokens=pipe.tokens, folder=pipe.folder, config=pipe.config)
    assert not isinstance(model.model.language_model.layers[0].mlp.gate_proj, backbone.DecodeLinear)
    frames = iter([259] * 6 + [258, 256])
    again = iter([259] * 6 + [258, 256])
    a = vv.generate(pipe, "Speaker 1: Hello there.", sampler=lambda l, i: next(frames), seed=4)
    b = vv.generate(plain, "Speaker 1: Hello there.", sampler=lambda l, i: next(again), seed=4)
    assert a.frames == b.frames == 6
    np.testing.assert_allclose(a.audio, b.audio, atol=1e-5 * np.abs(b.audio).max())


def test_drop_last_undoes_a_queued_step():
    from mlx_lm.models import qwen2

    args = qwen2.ModelArgs(model_type="qwen2", hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                           num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-6, vocab_size=10)
    lm = qwen2.Qwen2Model(args)
    pos = backbone.make_cache(lm)
    backbone.prefill(lm, mx.random.normal((1, 5, 32), key=mx.random.key(0)), pos)
    cache = backbone.CFGCache.from_prompt(pos)
    x = mx.random.normal((2, 1, 32), key=mx.random.key(1))
    first = backbone.forward(lm, x, cache)
    backbone.forward(lm, x * 3, cache)  # a step that turns out wrong
    cache.drop_last()
    second = backbone.forward(lm, x * 2, cache)
    pos2 = backbone.make_cache(lm)
    backbone.prefill(lm, mx.random.normal((1, 5, 32), key=mx.random.key(0)), pos2)
    ref = backbone.CFGCache.from_prompt(pos2)
    np.testing.assert_allclose(np.array(backbone.forward(lm, x, ref)), np.array(first), atol=1e-6)
    np.testing.assert_allclose(np.array(backbone.forward(lm, x * 2, ref)), np.array(second), atol=1e-6)
