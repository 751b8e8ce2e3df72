"""The one loader: raw folders of both layouts, converted folders, dtype policy, strictness, hub ids."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

import vibevoice_mlx as vv
from vibevoice_mlx import generation
from vibevoice_mlx.checkpoint import read_checkpoint
from vibevoice_mlx.cli import main
from vibevoice_mlx.errors import UserError
from vibevoice_mlx.loader import LoadError, load_model
from vibevoice_mlx.testing import HUB_COMMIT, cache_repo, offline_hub


def _params(model):
    return {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}


def test_both_raw_layouts_load_to_the_same_parameters(tiny):
    a, _ = load_model(tiny["original"], dtype="float32")
    b, _ = load_model(tiny["transformers"], dtype="float32")
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys() and len(pa) > 200
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


def test_float16_keeps_the_small_parameters_float32(tiny):
    model, _ = load_model(tiny["original"], dtype="float16")
    p = dict(tree_flatten(model.parameters()))
    assert p["model.language_model.layers.0.mlp.up_proj.weight"].dtype == mx.float16
    assert p["model.speech_scaling_factor"].dtype == mx.float32
    gammas = [k for k in p if k.endswith("gamma")]
    assert gammas and all(p[k].dtype == mx.float32 for k in gammas)


def test_a_bfloat16_checkpoint_loads_as_float32_without_holding_both_copies(tiny, tmp_path):
    # The real checkpoints are bfloat16 and the CPU runs float32: the load's peak must be the float32 model plus
    # about one tensor, not plus the whole checkpoint (which would add half the model here).
    folder = tmp_path / "bf16"
    shutil.copytree(tiny["original"], folder)
    (weights,) = folder.glob("*.safetensors")
    mx.save_safetensors(str(weights), {k: v.astype(mx.bfloat16) for k, v in mx.load(str(weights)).items()})
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    model, _ = load_model(folder, dtype="float32")
    params = dict(tree_flatten(model.parameters()))
    size = sum(v.nbytes for v in params.values())
    largest = max(v.nbytes for v in params.values())
    extra = mx.get_peak_memory() - before - size
    assert all(v.dtype == mx.float32 for v in params.values())
    assert extra <= 2 * largest, f"load peak {extra} bytes above the model ({size}); largest tensor {largest}"


def test_default_dtype_follows_the_device(tiny):
    model, _ = load_model(tiny["original"])
    want = mx.float16 if mx.default_device() == mx.gpu else mx.float32
    assert model.model.language_model.norm.weight.dtype == want


def test_a_wrong_layout_fails_loudly(tiny, tmp_path):
    """Transformers-layout weights under an original config: an error that names tensors, not a silent guess."""
    bad = tmp_path / "mixed"
    shutil.copytree(tiny["original"], bad)
    shutil.copy(tiny["transformers"] / "model.safetensors", bad / "model.safetensors")
    with pytest.raises(LoadError, match="missing .*unexpected .*model.audio_tower"):
        load_model(bad)


def test_unknown_config_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not a VibeVoice"):
        load_model(tmp_path)


def test_missing_folder_or_repo_is_a_clear_error(tmp_path, monkeypatch):
    offline_hub(monkeypatch, tmp_path / "hf-cache")
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        load_model("nobody/nothing")


def test_missing_tokenizer_says_how_to_fix(tiny):
    with pytest.raises(LoadError, match="--tokenizer"):
        vv.load(tiny["original"])


def test_say_converts_a_hub_checkpoint_once_and_reuses_it(tiny, tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    offline_hub(monkeypatch, cache)
    cache_repo(cache, "someone/VibeVoice-tiny-hf", tiny["transformers"])
    monkeypatch.setenv("VIBEVOICE_MLX_CACHE", str(tmp_path / "vv-cache"))
    seq = {"n": 0}

    def two_frames(logits, ids):
        seq["n"] += 1
        return ids[2] if seq["n"] % 4 in (1, 2) else (ids[1] if seq["n"] % 4 == 3 else ids[3])

    monkeypatch.setattr(generation, "greedy", two_frames)
    conversions = []
    import vibevoice_mlx.convert.convert as conv

    real = conv.convert
    monkeypatch.setattr(conv, "convert", lambda *a, **k: conversions.append(a) or real(*a, **k))
    runner = CliRunner()
    for name in ("a.wav", "b.wav"):
        r = runner.invoke(main, ["say", "Speaker 1: Hi.", "--model", "someone/VibeVoice-tiny-hf",
                                 "-o", str(tmp_path / name), "--seed", "3"])
        assert r.exit_code == 0, r.output
    assert len(conversions) == 1
    converted = list((tmp_path / "vv-cache" / "models").iterdir())
    assert [p.name for p in converted] == [f"someone--VibeVoice-tiny-hf--{HUB_COMMIT[:12]}--float16"]
    assert (tmp_path / "a.wav").read_bytes() == (tmp_path / "b.wav").read_bytes()
    # The repo moves to a new revision: the cached conversion of the old one is not reused.
    new = "fedcba9876543210fedcba9876543210fedcba98"
    root = cache / "models--someone--VibeVoice-tiny-hf"
    shutil.copytree(root / "snapshots" / HUB_COMMIT, root / "snapshots" / new)
    (root / "refs" / "main").write_text(new)
    r = runner.invoke(main, ["say", "Speaker 1: Hi.", "--model", "someone/VibeVoice-tiny-hf", "-o",
                             str(tmp_path / "c.wav"), "--seed", "3"])
    assert r.exit_code == 0, r.output
    assert len(conversions) == 2
    assert sorted(p.name for p in (tmp_path / "vv-cache" / "models").iterdir()) == sorted(
        [f"someone--VibeVoice-tiny-hf--{HUB_COMMIT[:12]}--float16", f"someone--VibeVoice-tiny-hf--{new[:12]}--float16"])


@pytest.mark.needs_torch
def test_untied_head_keeps_only_the_control_rows(tmp_path):
    """7B-like (untied lm_head): the pipeline keeps the 4 scored rows and drops the matrix, same logits."""
    from vibevoice_mlx.fixtures import build

    folders = build(tmp_path / "untied", "tiny", layouts=("original",), tie=False)
    full, _ = load_model(folders["original"], dtype="float32")
    ids = (257, 258, 259, 256)
    want = np.array(full.head_rows(ids))
    pipe = vv.load(folders["original"], tokenizer=folders["tokenizer"], dtype="float32")
    assert "lm_head" not in pipe.model
    np.testing.assert_array_equal(np.array(pipe.backend.head_rows), want)
    r = vv.generate(pipe, "Speaker 1: Hi.", sampler=lambda logits, ids_: ids_[2],
                    max_seconds=2 * 16 / 24000)
    assert r.frames == 2


def test_quantized_model_on_the_cpu_warns(tiny, tmp_path, caplog):
    import logging

    from vibevoice_mlx.convert.convert import convert

    folder = convert(str(tiny["transformers"]), tmp_path / "q8", quantize=True, q_bits=8)
    with caplog.at_level(logging.WARNING):
        load_model(folder)
    slow = any("quantized matmuls" in m for m in caplog.messages)
    assert slow == (mx.default_device() != mx.gpu)


@pytest.mark.parametrize("gen, field", [({"steps": 0}, "'steps'"), ({"guidance_scale": float("nan")}, "'guidance_scale'"),
                                        ({"num_diffusion_steps": 2.5}, "'num_diffusion_steps'")])
def test_bad_generation_defaults_name_the_file_and_field(tiny, tmp_path, gen, field):
    folder = tmp_path / "model"
    shutil.copytree(tiny["original"], folder)
    (folder / "generation_config.json").write_text(json.dumps(gen))
    with pytest.raises(LoadError) as e:
        read_checkpoint(folder)
    assert str(folder / "generation_config.json") in str(e.value) and field in str(e.value), e.value


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "tiny-mlx"
    vv.convert(str(tiny["original"]), str(out), tokenizer=str(tiny["tokenizer"]))
    return out


def _hidden_size_as_text(c):
    c["decoder_config"]["hidden_size"] = "64"
    return c


def _no_vae_dim(c):
    del c["semantic_tokenizer_config"]["vae_dim"]
    return c


@pytest.mark.parametrize("layout", ["original", "mlx"])
@pytest.mark.parametrize("edit, field", [(lambda c: {}, "neither 'decoder_config'"),
                                         (lambda c: [], "holds a JSON list"),
                                         (_hidden_size_as_text, "decoder_config.hidden_size must be a positive integer"),
                                         (_no_vae_dim, "semantic_tokenizer_config.vae_dim is missing")])
def test_a_bad_config_json_is_one_line_naming_the_file_and_field(tiny, converted, tmp_path, layout, edit, field):
    folder = tmp_path / "model"
    shutil.copytree(tiny["original"] if layout == "original" else converted, folder)
    config = edit(json.loads((folder / "config.json").read_text()))
    (folder / "config.json").write_text(json.dumps(config))
    r = CliRunner().invoke(main, ["say", "Speaker 1: Hi.", "--model", str(folder), "--tokenizer",
                                  str(tiny["tokenizer"]), "--dry-run"])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    [error] = [line for line in r.output.splitlines() if line.startswith("Error")]
    assert str(folder / "config.json") in error and field in error, error


def test_the_torch_backend_on_a_converted_folder_says_what_the_folder_is(converted):
    with pytest.raises(UserError, match="is a converted MLX folder, which only the MLX backend runs"):
        vv.load(converted, backend="torch")
