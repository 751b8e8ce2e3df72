"""`vibevoice-mlx convert` on the tiny fixture: layouts, dtype policy, quantization, strictness, atomicity, hub."""

import json
import logging
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from vibevoice_mlx.cli import main
from vibevoice_mlx.convert import convert as convert_module
from vibevoice_mlx.convert.convert import ConversionError, convert
from vibevoice_mlx.convert.dtypes import DtypeError
from vibevoice_mlx.keys import torch_transpose
from vibevoice_mlx.hub import HubError, resolve
from vibevoice_mlx.loader import load_model
from vibevoice_mlx.testing import HUB_COMMIT, cache_repo, offline_hub, tiny_checkpoint

# The language model's Linear layers of the tiny config (2 layers): the only ones quantization may touch.
LM_LINEARS = {f"model.language_model.layers.{i}.{m}" for i in range(2) for m in
              ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]}


def _tensors(folder: Path) -> dict:
    """All tensors of an MLX folder, as numpy (bit-exact: float16/float32/uint32 only)."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({k: np.array(v) for k, v in mx.load(str(f)).items()})
    return out


def _copy(src: Path, dst: Path, edit=None) -> Path:
    """A copy of a float32 checkpoint folder, with `edit(tensors)` applied to its weights."""
    shutil.copytree(src, dst)
    if edit is not None:
        tensors = load_file(dst / "model.safetensors")
        edit(tensors)
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _assert_clean_error(excinfo, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, msg


def _leftovers(parent: Path) -> list:
    return sorted(p.name for p in parent.iterdir() if ".converting-" in p.name or ".old-" in p.name)


@pytest.fixture()
def out(tmp_path):
    return tmp_path / "mlx"


def test_both_layouts_give_identical_folders(tiny, tmp_path):
    a = convert(str(tiny["original"]), tmp_path / "a", tokenizer=str(tiny["tokenizer"]), max_shard_bytes=200_000)
    b = convert(str(tiny["transformers"]), tmp_path / "b", max_shard_bytes=200_000)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    assert sum(f.endswith(".safetensors") for f in files) > 1  # sharded, with an index
    for name in files:
        if name not in ("config.json", "README.md"):
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (a, b))
    assert ca.pop("conversion")["source_layout"] == "original"
    assert cb.pop("conversion")["source_layout"] == "transformers"
    assert ca == cb
    # The original config has no token ids: they come from the tokenizer and agree with the -hf config's.
    assert ca["token_ids"] == {"eos": 256, "speech_start": 257, "speech_end": 258, "speech_diffusion": 259}


def test_float32_loads_back_equal_to_source(tiny, out):
    convert(str(tiny["original"]), out, dtype="float32", tokenizer=str(tiny["tokenizer"]))
    source = load_file(tiny["original"] / "model.safetensors")
    model, _ = load_model(out, dtype="float32")
    from mlx.utils import tree_flatten

    params = dict(tree_flatten(model.parameters()))
    assert set(params) == set(source)  # the fixture is tied: it stores no lm_head, and none is added
    for k, v in params.items():
        perm = torch_transpose(k)
        got = np.array(v) if perm is None else np.array(v).transpose(perm)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, source[k], err_msg=k)
    card = (out / "README.md").read_text()
    assert f"vibevoice-mlx say --model {out}" in card and str(tiny["original"]) in card
    # the install command is one that works: the package is not on PyPI under its name
    assert "pip install vibevoice-mlx\n" not in card and "pip install ./vibevoice-mlx" in card
    assert json.loads((out / "generation_config.json").read_text()) == {"steps": 10, "cfg_scale": 1.3}
    assert (out / "tokenizer.json").read_bytes() == (tiny["tokenizer"] / "tokenizer.json").read_bytes()


def test_float16_keeps_the_policy_tensors_float32(tiny, out):
    """On disk as in memory (`Model.cast_predicate`): the latent scalars and the layer scales stay float32."""
    convert(str(tiny["original"]), out, tokenizer=str(tiny["tokenizer"]))
    source = load_file(tiny["original"] / "model.safetensors")
    written = _tensors(out)
    assert set(written) == set(source)
    for k, v in written.items():
        leaf = k.rsplit(".", 1)[-1]
        stays = leaf in ("gamma", "ffn_gamma") or k.startswith("model.speech_")
        assert v.dtype == (np.float32 if stays else np.float16), k
        perm = torch_transpose(k)
        got = v if perm is None else v.transpose(perm)
        np.testing.assert_array_equal(got, source[k].astype(v.dtype), err_msg=k)
    assert written["model.speech_scaling_factor"].shape == ()


@pytest.mark.needs_torch
def test_bfloat16_to_float16_counts_subnormals_and_flushes(tmp_path, out):
    import torch
    from safetensors.torch import load_file as load_torch, save_file as save_torch

    src = tiny_checkpoint(tmp_path / "bf16", dtype="bfloat16")["original"]
    src = Path(shutil.copytree(src, tmp_path / "edited"))
    tensors = load_torch(src / "model.safetensors")
    w = tensors["model.prediction_head.cond_proj.weight"]
    w.view(-1)[:4] = torch.tensor([1e-9, -2e-8, 3e-6, 1e-5])  # two flush to zero, two become subnormal
    tensors["model.acoustic_tokenizer.encoder.stages.0.0.gamma"].view(-1)[0] = 1e-9  # stays float32: not counted
    save_torch(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    # Independent count over the tensors written as float16 (all but the layer scales and latent scalars).
    subnormal = flushed = 0
    for k, t in tensors.items():
        if not (k.rsplit(".", 1)[-1] in ("gamma", "ffn_gamma") or k.startswith("model.speech_")):
            x = t.float()
            subnormal += int(((x != 0) & (x.abs() < 2.0**-14)).sum())
            flushed += int(((x != 0) & (t.to(torch.float16) == 0)).sum())
    assert flushed >= 2 and subnormal > flushed
    convert(str(src), out, dtype="float16", tokenizer=str(tiny_checkpoint(tmp_path / "bf16", dtype="bfloat16")
                                                          ["tokenizer"]))
    conversion = json.loads((out / "config.json").read_text())["conversion"]
    assert conversion["float16_subnormal_values"] == subnormal
    assert conversion["float16_flushed_values"] == flushed
    written = _tensors(out)
    tiny_gamma = tensors["model.acoustic_tokenizer.encoder.stages.0.0.gamma"].view(-1)[0].float().item()
    assert written["model.acoustic_tokenizer.encoder.stages.0.0.gamma"].flat[0] == np.float32(tiny_gamma) != 0
    assert written["model.prediction_head.cond_proj.weight"].dtype == np.float16


def test_float16_overflow_is_refused(tiny, tmp_path, out):
    def big(t):
        t["model.prediction_head.cond_proj.weight"][0, 0] = 1e5

    src = _copy(tiny["original"], tmp_path / "big", big)
    with pytest.raises(DtypeError) as e:
        convert(str(src), out, dtype="float16", tokenizer=str(tiny["tokenizer"]))
    _assert_clean_error(e, "model.prediction_head.cond_proj.weight", "--dtype bfloat16")
    assert not out.exists() and _leftovers(tmp_path) == []
    convert(str(src), out, dtype="bfloat16", tokenizer=str(tiny["tokenizer"]))  # bfloat16 has the range
    assert out.is_dir()


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_language_model_linears_only(tiny, out, bits):
    convert(str(tiny["transformers"]), out, quantize=True, q_bits=bits, q_group_size=64)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": bits}
    written = _tensors(out)
    quantized = {k.rsplit(".", 1)[0] for k in written if k.endswith(".scales")}
    assert quantized == LM_LINEARS
    source = load_file(tiny["original"] / "model.safetensors")
    for k, v in written.items():
        path = k.rsplit(".", 1)[0]
        if path in quantized:
            continue
        assert not np.issubdtype(v.dtype, np.integer), k  # nothing else packed
    # The loader needs no flag. The packed weights are the quantization of the float16 source, and dequantize to
    # within one quantization step of it, group by group.
    model, _ = load_model(out, dtype="float32")
    for path in sorted(LM_LINEARS):
        layer = model
        for part in path.split("."):
            layer = layer[int(part)] if part.isdigit() else getattr(layer, part)
        src = source[f"{path}.weight"]
        want = mx.quantize(mx.array(src).astype(mx.float16), group_size=64, bits=bits)
        for got, ref in zip([layer.weight, written[f"{path}.scales"], written[f"{path}.biases"]], want):
            np.testing.assert_array_equal(np.array(got), np.array(ref), err_msg=path)
        assert layer.weight.dtype == mx.uint32 and layer.weight.shape[-1] * 32 // bits == src.shape[-1]
        w = mx.dequantize(layer.weight, layer.scales, layer.biases, group_size=64, bits=bits)
        err = np.abs(np.array(w.astype(mx.float32)) - src).reshape(src.shape[0], -1, 64).max(-1)
        step = np.abs(np.array(layer.scales.astype(mx.float32)))
        assert np.all(err <= step + 1e-3), path  # + float16 rounding of the source


@pytest.mark.needs_torch
def test_untied_head_is_kept_and_tied_copy_is_ignored(tmp_path):
    untied = tiny_checkpoint(tmp_path / "untied", tie=False)
    out = convert(str(untied["original"]), tmp_path / "untied-mlx", dtype="float32",
                  tokenizer=str(untied["tokenizer"]))
    head = load_file(untied["original"] / "model.safetensors")["lm_head.weight"]
    np.testing.assert_array_equal(_tensors(out)["lm_head.weight"], head)

    tied = tiny_checkpoint(tmp_path / "tied")

    def add_head(t):
        t["lm_head.weight"] = np.ones_like(t["model.language_model.embed_tokens.weight"])

    src = _copy(tied["original"], tmp_path / "tied-with-copy", add_head)
    out = convert(str(src), tmp_path / "tied-mlx", tokenizer=str(tied["tokenizer"]))
    assert "lm_head.weight" not in _tensors(out)


def test_sharded_source_with_index(tiny, tmp_path):
    src = tmp_path / "sharded"
    shutil.copytree(tiny["transformers"], src)
    tensors = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    keys = sorted(tensors)
    parts = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for i, part in enumerate(parts):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, src / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    a = convert(str(src), tmp_path / "a")
    b = convert(str(tiny["transformers"]), tmp_path / "b")
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k, v in ta.items():
        np.testing.assert_array_equal(v, tb[k], err_msg=k)

    (src / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ConversionError) as e:
        convert(str(src), tmp_path / "c")
    _assert_clean_error(e, "model-00002-of-00002.safetensors", "incomplete")
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    "case, edit, words",
    [
        ("missing", lambda t: t.pop("model.acoustic_connector.fc2.bias"), ["missing", "acoustic_connector.fc2.bias"]),
        ("extra", lambda t: t.update({"model.extra.weight": np.zeros(3, np.float32)}),
         ["unexpected", "model.extra.weight"]),
        ("shape", lambda t: t.update({"model.semantic_connector.fc1.weight": np.zeros((64, 11), np.float32)}),
         ["model.semantic_connector.fc1.weight", "(64, 11)", "(64, 12)"]),
    ],
)
def test_strict_errors_name_the_tensor(tiny, tmp_path, out, case, edit, words):
    src = _copy(tiny["original"], tmp_path / case, edit)
    with pytest.raises(ConversionError) as e:
        convert(str(src), out, tokenizer=str(tiny["tokenizer"]))
    _assert_clean_error(e, *words)
    assert not out.exists() and _leftovers(tmp_path) == []


def test_truncated_safetensors(tiny, tmp_path, out):
    src = _copy(tiny["original"], tmp_path / "truncated")
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError) as e:
        convert(str(src), out, tokenizer=str(tiny["tokenizer"]))
    _assert_clean_error(e, "model.safetensors", "truncated")
    assert not out.exists() and _leftovers(tmp_path) == []


@pytest.mark.needs_torch
def test_pickle_refused_unless_allowed(tiny, tmp_path):
    import torch
    from safetensors.torch import load_file as load_torch

    src = _copy(tiny["original"], tmp_path / "pickled")
    torch.save(load_torch(src / "model.safetensors"), src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    out = tmp_path / "out"
    with pytest.raises(ConversionError) as e:
        convert(str(src), out, tokenizer=str(tiny["tokenizer"]))
    _assert_clean_error(e, "pytorch_model.bin", "--allow-pickle")
    assert not out.exists()
    convert(str(src), out, tokenizer=str(tiny["tokenizer"]), allow_pickle=True)
    ref = convert(str(tiny["original"]), tmp_path / "ref", tokenizer=str(tiny["tokenizer"]))
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()


def test_existing_output_needs_force(tiny, tmp_path, out):
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError) as e:
        convert(str(tiny["transformers"]), out)
    _assert_clean_error(e, str(out), "--force")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    convert(str(tiny["transformers"]), out, force=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert _leftovers(tmp_path) == []
    # --force never deletes the checkpoint it reads.
    with pytest.raises(ConversionError) as e:
        convert(str(tiny["transformers"]), tiny["transformers"].parent, force=True)
    _assert_clean_error(e, "source checkpoint")
    assert (tiny["transformers"] / "model.safetensors").exists()
    # A converted folder is not a checkpoint to convert again (its convs are already transposed).
    with pytest.raises(ConversionError) as e:
        convert(str(out), tmp_path / "again")
    _assert_clean_error(e, "MLX folder already")


def test_interrupted_conversion_leaves_nothing(tiny, tmp_path, out, monkeypatch):
    calls = []
    real_save = mx.save_safetensors

    def save_then_interrupt(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_save(*args, **kwargs)

    monkeypatch.setattr(convert_module.mx, "save_safetensors", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert(str(tiny["transformers"]), out, max_shard_bytes=100_000)
    assert len(calls) == 3  # two shards were already on disk when Ctrl-C came
    assert not out.exists() and _leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_missing_tokenizer_is_a_clear_error(tiny, tmp_path, out, monkeypatch):
    offline_hub(monkeypatch, tmp_path / "hf-cache")
    with pytest.raises(ConversionError) as e:
        convert(str(tiny["original"]), out)  # its preprocessor config names Qwen/Qwen2.5-1.5B: not cached
    _assert_clean_error(e, "Qwen/Qwen2.5-1.5B", "--tokenizer")
    assert not out.exists()


# --- hub -----------------------------------------------------------------------------------------------------



def test_hub_id_from_offline_cache(tiny, tmp_path, out, monkeypatch):
    cache = tmp_path / "hf-cache"
    offline_hub(monkeypatch, cache)
    snapshot = cache_repo(cache, "someone/VibeVoice-tiny-hf", tiny["transformers"])
    assert resolve("someone/VibeVoice-tiny-hf") == snapshot
    convert("someone/VibeVoice-tiny-hf", out)
    conversion = json.loads((out / "config.json").read_text())["conversion"]
    assert conversion["source"] == "someone/VibeVoice-tiny-hf" and conversion["revision"] == HUB_COMMIT


def test_hub_id_not_cached_offline(tmp_path, out, monkeypatch):
    offline_hub(monkeypatch, tmp_path / "hf-cache")
    with pytest.raises(HubError) as e:
        convert("microsoft/VibeVoice-1.5B", out)
    _assert_clean_error(e, "microsoft/VibeVoice-1.5B", "HF_HUB_OFFLINE", "local folder")
    assert not out.exists()
    with pytest.raises(HubError) as e:
        resolve("./no/such/folder")
    _assert_clean_error(e, "No such folder")


# --- CLI -----------------------------------------------------------------------------------------------------


def test_a_relative_source_is_recorded_as_an_absolute_path(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny["original"].parent)
    convert(tiny["original"].name, tmp_path / "rel", tokenizer=str(tiny["tokenizer"]))
    source = json.loads((tmp_path / "rel" / "config.json").read_text())["conversion"]["source"]
    assert Path(source).is_absolute() and Path(source).samefile(tiny["original"])  # found from any folder


def test_comfyuis_missing_model_folder_is_created_and_no_other(tiny, tmp_path):
    comfy = tmp_path / "ComfyUI"  # a fresh ComfyUI: custom_nodes/ and models/, no models/vibevoice/ yet
    for sub in ("custom_nodes", "models/checkpoints"):
        (comfy / sub).mkdir(parents=True)
    target = comfy / "models" / "vibevoice" / "tiny-mlx"
    convert(str(tiny["original"]), target, tokenizer=str(tiny["tokenizer"]))
    assert (target / "config.json").is_file() and _leftovers(target.parent) == []
    for missing in (tmp_path / "elsewhere" / "vibevoice" / "x", tmp_path / "models" / "vibevoice" / "x"):
        with pytest.raises(ConversionError) as e:
            convert(str(tiny["original"]), missing, tokenizer=str(tiny["tokenizer"]))
        _assert_clean_error(e, str(missing.parent), "does not exist")
        assert not missing.parent.exists()


def test_cli_convert_and_user_errors(tiny, tmp_path, monkeypatch, caplog):
    offline_hub(monkeypatch, tmp_path / "hf-cache")
    out = tmp_path / "cli"
    runner = CliRunner()
    args = ["convert", "--model", str(tiny["original"]), "--mlx-path", str(out), "--tokenizer",
            str(tiny["tokenizer"]), "-q", "--q-bits", "8", "--dtype", "bfloat16"]
    with caplog.at_level(logging.INFO, logger="vibevoice_mlx"):
        r = runner.invoke(main, args)
    assert r.exit_code == 0, r.output
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 8 and config["conversion"]["dtype"] == "bfloat16"
    summary = [m for m in caplog.messages if m.startswith("Converted")]
    n_params = sum(v.size for v in load_file(tiny["original"] / "model.safetensors").values())
    assert len(summary) == 1 and f"{n_params:,} parameters" in summary[0] and "bfloat16, 8-bit" in summary[0]

    for bad, words in [(args, ["already exists", "--force"]),
                       (["convert", "--model", "nobody/nothing", "--mlx-path", str(tmp_path / "x")],
                        ["nobody/nothing", "HF_HUB_OFFLINE"])]:
        r = runner.invoke(main, bad)
        assert r.exit_code == 1, r.output
        assert isinstance(r.exception, SystemExit) and "Traceback" not in r.output, r.output
        lines = [line for line in r.output.splitlines() if line.startswith("Error:")]
        assert len(lines) == 1 and all(w in lines[0] for w in words), r.output
    r = runner.invoke(main, ["convert", "--model", str(tiny["original"]), "--q-bits", "3"])
    assert r.exit_code == 2 and "'3' is not one of" in r.output


def test_a_full_disk_is_one_line_and_leaves_nothing(tiny, tmp_path, monkeypatch):
    """MLX says only "[write] Unable to write ..." when the disk is full: with no space left it is one line."""
    import collections

    def full(*args, **kwargs):
        raise RuntimeError("[write] Unable to write 8 bytes to file.")

    monkeypatch.setattr(convert_module.mx, "save_safetensors", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: collections.namedtuple("u", "total used free")(1, 1, 0))
    (tmp_path / "out").mkdir()
    r = CliRunner().invoke(main, ["convert", "--model", str(tiny["original"]), "--mlx-path",
                                  str(tmp_path / "out" / "m"), "--tokenizer", str(tiny["tokenizer"])])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert "No space left on device while writing" in r.output and "nothing was written" in r.output, r.output
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("option", [["--q-bits", "8"], ["--q-group-size", "32"]])
def test_quantization_settings_without_q_are_refused(tiny, tmp_path, option):
    r = CliRunner().invoke(main, ["convert", "--model", str(tiny["original"]), "--mlx-path", str(tmp_path / "m"),
                                  "--tokenizer", str(tiny["tokenizer"]), *option])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert r.output.strip().splitlines()[-1].startswith("Error: --q-bits and --q-group-size take effect with -q")
    assert not (tmp_path / "m").exists()
    with pytest.raises(ConversionError, match="add -q"):
        convert(str(tiny["original"]), str(tmp_path / "m"), q_bits=8)


def test_a_read_only_mlx_path_is_one_line(tiny, read_only_folder):
    target = read_only_folder / "mlx"
    r = CliRunner().invoke(main, ["convert", "--model", str(tiny["original"]), "--mlx-path", str(target),
                                  "--tokenizer", str(tiny["tokenizer"])])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    [error] = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert f"Cannot write --mlx-path {target}" in error and "not writable" in error, error
