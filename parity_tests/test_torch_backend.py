"""The PyTorch path: device/dtype policy, CPU fallbacks, memory release, loading both layouts, generation."""

import json
import logging
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vibevoice_mlx import memory, torch_backend as tb
from vibevoice_mlx.fixtures import build

# Tiny fixture ids (vibevoice_mlx/fixtures.py): eos 256, speech_start 257, speech_end 258, speech_diffusion 259.
EOS, START, END, DIFF = 256, 257, 258, 259
HOP, LATENT = 16, 8
VOICE = (0.1 * np.random.RandomState(0).randn(50)).astype(np.float32)  # 50 samples -> ceil(50/16) = 4 frames
PROMPT = [10, 11, 12, START] + [DIFF] * 4 + [END, 13, 14, START]
FORCED = [DIFF] * 5 + [END, EOS]
NOISE = np.random.RandomState(1).randn(5, LATENT).astype(np.float32)


def messages(caplog):
    return [r.getMessage() for r in caplog.records]


def assert_logged(caplog, line):
    assert f"[VibeVoice] {line}" in messages(caplog), f"{line!r} not logged; got {messages(caplog)}"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from threads, and on a busy CPU torch's thread sync costs up to 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tiny):
    """Both layouts of the tiny checkpoint, loaded on the CPU."""
    return {"original": tb.load_torch_model(tiny["original"], device="cpu", tokenizer_path=tiny["tokenizer"]),
            "transformers": tb.load_torch_model(tiny["transformers"], device="cpu")}


def run(model, **kw):
    kw.setdefault("noise", NOISE)
    kw.setdefault("forced_tokens", FORCED)
    return tb.torch_generate(model, PROMPT, [VOICE], **kw)


# --- device and dtype policy ---------------------------------------------------------------------------------


def test_auto_device_prefers_mps_on_macos_then_cuda_then_cpu(caplog):
    caplog.set_level(logging.INFO, logger="vibevoice_mlx")
    assert tb.resolve_device("auto", platform="darwin", mps_available=True, cuda_available=False) == "mps"
    assert_logged(caplog, "MPS (Metal Performance Shaders) detected - macOS M chip GPU acceleration")
    caplog.clear()
    # MPS only counts on macOS; probes may be callables.
    assert tb.resolve_device("auto", platform="linux", mps_available=True, cuda_available=lambda: True) == "cuda"
    assert tb.resolve_device("auto", platform="darwin", mps_available=False, cuda_available=True) == "cuda"
    assert tb.resolve_device("auto", platform="linux", mps_available=False, cuda_available=False) == "cpu"
    assert tb.resolve_device("auto", platform="darwin", mps_available=False, cuda_available=False) == "cpu"
    assert not any("MPS (Metal" in m for m in messages(caplog))


def test_explicit_device_overrides_probes():
    assert tb.resolve_device("cpu", platform="darwin", mps_available=True, cuda_available=True) == "cpu"
    assert tb.resolve_device("CUDA:1", platform="darwin", mps_available=True) == "cuda:1"
    assert tb.resolve_device("mps", platform="linux", mps_available=False) == "mps"
    with pytest.raises(ValueError, match="tpu"):
        tb.resolve_device("tpu")


def test_dtype_policy():
    assert tb.resolve_dtype("auto", "mps") == "float16"
    assert tb.resolve_dtype("auto", "cuda", bf16_supported=True) == "bfloat16"
    assert tb.resolve_dtype("auto", "cuda:0", bf16_supported=False) == "float16"
    assert tb.resolve_dtype("auto", "cpu") == "float32"
    assert tb.resolve_dtype("bf16", "mps") == "bfloat16"
    assert tb.resolve_dtype("fp32", "mps") == "float32"
    with pytest.raises(ValueError, match="int3"):
        tb.resolve_dtype("int3", "cpu")


# --- moving the model and falling back to the CPU ------------------------------------------------------------


def test_auto_on_mac_loads_float16_and_moves_to_mps(tiny, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="vibevoice_mlx")
    monkeypatch.setattr(tb, "sys", SimpleNamespace(platform="darwin"))
    monkeypatch.setattr(tb, "_torch_mps_available", lambda: True)
    moves = []
    monkeypatch.setattr(tb, "_move_to", lambda model, device, dtype=None: moves.append((device, dtype)) or model)
    model = tb.load_torch_model(tiny["transformers"])
    assert moves == [("mps", None)]
    assert next(model.parameters()).dtype == torch.float16  # loaded on the CPU in the MPS dtype, then moved
    for line in ["MPS (Metal Performance Shaders) detected - macOS M chip GPU acceleration",
                 "Loading model for MPS device with float16", "Model moved to MPS device",
                 "Initialized with device: mps, type: mps"]:
        assert_logged(caplog, line)


@pytest.mark.parametrize("layout", ["original", "transformers"])
def test_failing_move_falls_back_to_cpu_float32(tiny, monkeypatch, caplog, layout):
    caplog.set_level(logging.INFO, logger="vibevoice_mlx")
    real_move = tb._move_to

    def move(model, device, dtype=None):
        if device != "cpu":
            raise RuntimeError("MPS backend out of memory (simulated)")
        return real_move(model, device, dtype)

    monkeypatch.setattr(tb, "_move_to", move)
    model = tb.load_torch_model(tiny[layout], device="mps", tokenizer_path=tiny["tokenizer"])
    p = next(model.parameters())
    assert (p.device.type, p.dtype) == ("cpu", torch.float32)
    assert_logged(caplog, "Loading model for MPS device with float16")
    assert_logged(caplog, "Failed to move model to MPS, using CPU")
    assert_logged(caplog, "Initialized with device: cpu, type: cpu")
    assert "[VibeVoice] Model moved to MPS device" not in messages(caplog)


def test_device_error_during_generation_retries_once_on_cpu(tiny, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="vibevoice_mlx")
    model = tb.load_torch_model(tiny["transformers"], device="cpu")
    want = run(model).audio
    state = {"on_cpu": False, "calls": 0, "fallbacks": 0}
    real_once, real_device, real_fallback = tb._generate_once, tb._device_of, tb._fall_back_to_cpu

    def once(*args, **kw):
        state["calls"] += 1
        if not state["on_cpu"]:
            raise NotImplementedError("The operator 'aten::foo' is not currently implemented for the MPS device.")
        return real_once(*args, **kw)

    def fallback(m):
        state["fallbacks"] += 1
        state["on_cpu"] = True
        return real_fallback(m)

    monkeypatch.setattr(tb, "_generate_once", once)
    monkeypatch.setattr(tb, "_device_of", lambda m: real_device(m) if state["on_cpu"] else torch.device("mps"))
    monkeypatch.setattr(tb, "_fall_back_to_cpu", fallback)
    got = run(model)
    assert (state["calls"], state["fallbacks"]) == (2, 1)
    assert np.array_equal(got.audio, want) and got.device == "cpu"
    assert any("retrying on CPU" in m for m in messages(caplog))
    assert_logged(caplog, "Initialized with device: cpu, type: cpu")


def test_only_device_errors_off_the_cpu_are_retried(tiny, monkeypatch):
    model = tb.load_torch_model(tiny["transformers"], device="cpu")
    calls = []

    def fail(err):
        def once(*a, **k):
            calls.append(1)
            raise err
        return once

    monkeypatch.setattr(tb, "_device_of", lambda m: torch.device("mps"))
    monkeypatch.setattr(tb, "_fall_back_to_cpu", lambda m: None)
    monkeypatch.setattr(tb, "_generate_once", fail(RuntimeError("shapes do not match")))
    with pytest.raises(RuntimeError, match="shapes"):
        run(model)
    assert len(calls) == 1  # not a device error: no retry
    calls.clear()
    monkeypatch.setattr(tb, "_generate_once", fail(RuntimeError("MPS: unsupported op")))
    with pytest.raises(RuntimeError, match="MPS"):
        run(model)
    assert len(calls) == 2  # retried once, then the error stands
    calls.clear()
    monkeypatch.setattr(tb, "_device_of", lambda m: torch.device("cpu"))
    with pytest.raises(RuntimeError, match="MPS"):
        run(model)
    assert len(calls) == 1  # already on the CPU: nothing to fall back to


# --- memory release --------------------------------------------------------------------------------------------


def test_free_memory_clears_every_backend(monkeypatch, caplog):
    import mlx.core as mx

    caplog.set_level(logging.INFO, logger="vibevoice_mlx")
    called = []
    monkeypatch.setattr(memory.gc, "collect", lambda: called.append("gc"))
    monkeypatch.setattr(mx, "clear_cache", lambda: called.append("mlx"))
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "empty_cache", lambda: called.append("mps"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: called.append("cuda"))
    assert memory.free_memory() == ["gc", "mlx", "mps", "cuda"]
    assert called == ["gc", "mlx", "mps", "cuda"]
    assert_logged(caplog, "MPS cache cleared")
    # Without torch imported there is no torch cache to clear, and torch is not imported for it.
    called.clear()
    monkeypatch.delitem(sys.modules, "torch")
    assert memory.free_memory() == ["gc", "mlx"] and called == ["gc", "mlx"]


def test_modules_import_without_torch():
    code = ("import sys; import vibevoice_mlx.memory, vibevoice_mlx.torch_backend, vibevoice_mlx.doctor; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("flag", [True, False])
def test_free_memory_after_generate(models, monkeypatch, flag):
    calls = []
    monkeypatch.setattr(memory, "free_memory", lambda: calls.append(1))
    run(models["transformers"], free_memory_after_generate=flag)
    assert len(calls) == (1 if flag else 0)


# --- loading both layouts ----------------------------------------------------------------------------------------


def test_both_layouts_load_identical_state_dicts(models):
    a, b = (models[k].state_dict() for k in ("original", "transformers"))
    assert set(a) == set(b)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"tensors differ between layouts: {differ[:5]}"
    m = models["original"]
    assert m.lm_head.weight is m.model.language_model.embed_tokens.weight  # 1.5B-style tied head
    assert (m.config.audio_token_id, m.config.eos_token_id) == (DIFF, EOS)  # ids read from tokenizer.json


def test_sharded_and_untied_original_checkpoints(tmp_path, models, tiny):
    sharded = build(tmp_path / "sharded", "tiny", layouts=("original",), max_shard_bytes=200_000,
                    tokenizer=False)["original"]
    assert (sharded / "model.safetensors.index.json").is_file()
    got = tb.load_torch_model(sharded, device="cpu", tokenizer_path=tiny["tokenizer"]).state_dict()
    want = models["original"].state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)

    untied = build(tmp_path / "untied", "tiny", layouts=("original",), tie=False, tokenizer=False)["original"]
    from safetensors.torch import load_file

    stored = load_file(str(untied / "model.safetensors"))["lm_head.weight"]
    m = tb.load_torch_model(untied, device="cpu", tokenizer_path=tiny["tokenizer"])
    assert torch.equal(m.lm_head.weight, stored)
    assert not torch.equal(m.lm_head.weight, m.model.language_model.embed_tokens.weight)


@pytest.mark.parametrize("change, message", [
    ("drop", "missing key model.prediction_head.cond_proj.weight"),
    ("extra", "unexpected key model.not_a_module.weight"),
    ("shape", "wrong shape model.prediction_head.cond_proj.weight"),
])
def test_original_load_is_strict(tmp_path, tiny, change, message):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny["original"], folder)
    weights = load_file(str(folder / "model.safetensors"))
    key = "model.prediction_head.cond_proj.weight"
    if change == "drop":
        del weights[key]
    elif change == "extra":
        weights["model.not_a_module.weight"] = torch.zeros(2)
    else:
        weights[key] = weights[key][:, :-1].contiguous()
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(tb.WeightLoadError, match=message):
        tb.load_torch_model(folder, device="cpu", tokenizer_path=tiny["tokenizer"])


def test_original_layout_without_tokenizer_ids_that_fit_is_an_error(tiny):
    with pytest.raises(tb.WeightLoadError, match="tokenizer_path"):
        tb.load_torch_model(tiny["original"], device="cpu")  # Qwen's ids do not fit the tiny vocabulary


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_attention_option(tiny, attention):
    for layout in ("original", "transformers"):
        m = tb.load_torch_model(tiny[layout], device="cpu", attention=attention, tokenizer_path=tiny["tokenizer"])
        assert m.config.text_config._attn_implementation == attention


# --- generation ---------------------------------------------------------------------------------------------------


def test_forced_frames_with_injected_noise_give_the_same_audio_from_both_layouts(models):
    a, b = run(models["original"]), run(models["transformers"])
    assert a.tokens.tolist() == FORCED
    assert a.audio.dtype == np.float32 and a.audio.shape == (5 * HOP,) and a.sample_rate == 24000
    assert float(np.sqrt(np.mean(a.audio**2))) > 1e-2  # non-silent
    assert np.array_equal(a.audio, b.audio)  # same weights, same noise, same forced tokens: bit-identical
    assert np.array_equal(run(models["original"]).audio, a.audio)  # deterministic run to run


def test_noise_is_injected_per_frame(models):
    m = models["transformers"]
    base = run(m).audio
    assert np.array_equal(run(m, noise=lambda i: NOISE[i]).audio, base)  # callable == table
    other = NOISE.copy()
    other[3] += 1.0
    changed = run(m, noise=other).audio
    assert np.array_equal(changed[: 3 * HOP], base[: 3 * HOP])  # causal decoder: frames before 3 unchanged
    assert not np.allclose(changed[3 * HOP:], base[3 * HOP:])
    with pytest.raises(ValueError, match="5 frames"):
        run(m, noise=NOISE, forced_tokens=[DIFF] * 6 + [EOS])
    assert "_sample_audio_latent" not in m.__dict__ and "_get_logits_processor" not in m.__dict__


def test_tokens_are_greedy_without_token_level_cfg(models, monkeypatch):
    from transformers.generation.logits_process import UnbatchedClassifierFreeGuidanceLogitsProcessor as Cfg

    calls = []
    monkeypatch.setattr(Cfg, "__call__", lambda self, i, s: calls.append(1) or s)
    out = tb.torch_generate(models["transformers"], [10, 11, START], max_new_tokens=3, cfg_scale=1.3)
    assert calls == []  # transformers would add this processor for guidance_scale != 1
    assert len(out.tokens) >= 1 and set(out.tokens.tolist()) <= {EOS, START, END, DIFF}


def test_token_sampler_sees_masked_logits(models):
    seen = []

    def sampler(logits):
        seen.append(np.flatnonzero(np.isfinite(logits)).tolist())
        return DIFF if len(seen) <= 2 else EOS

    out = tb.torch_generate(models["transformers"], PROMPT, [VOICE], noise=NOISE, token_sampler=sampler)
    assert out.tokens.tolist() == [DIFF, DIFF, EOS] and out.audio.shape == (2 * HOP,)
    assert seen[0] == [EOS, START, END, DIFF]


def test_input_checks(models):
    m = models["transformers"]
    with pytest.raises(ValueError, match="4 voice placeholder tokens but the voices give 5"):
        tb.torch_generate(m, PROMPT, [np.zeros(70, np.float32)], forced_tokens=FORCED)
    with pytest.raises(ValueError, match="speech_input_mask"):
        tb.torch_generate(m, PROMPT, [VOICE], speech_input_mask=np.zeros(len(PROMPT), bool))
    with pytest.raises(ValueError, match=r"forced tokens \[5\]"):
        run(m, forced_tokens=[5])
    mask = np.array(PROMPT) == DIFF
    assert run(m, speech_input_mask=mask).tokens.tolist() == FORCED


def test_generation_config_of_transformers_folder_is_not_needed(tiny, models, tmp_path):
    # The injected scheduler and explicit settings drive generation, not generation_config.json.
    folder = tmp_path / "tf"
    shutil.copytree(tiny["transformers"], folder)
    (folder / "generation_config.json").write_text(json.dumps({"guidance_scale": 5.0, "num_diffusion_steps": 3}))
    m = tb.load_torch_model(folder, device="cpu")
    assert np.array_equal(run(m).audio, run(models["transformers"]).audio)
