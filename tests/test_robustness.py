"""Every bad input gets a clear one-line answer: script files, model folders, voices, memory, missing extras."""

import builtins
import json
import logging
import os
import shutil

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

import vibevoice_mlx as vv
from vibevoice_mlx import generation, preflight
from vibevoice_mlx.cli import main
from vibevoice_mlx.errors import UserError
from vibevoice_mlx.processor import parse_script, read_script_file

TEXT = "Speaker 1: Héllo “there”.\nSpeaker 2: Grüße!\n"


@pytest.mark.parametrize("encoding, data", [
    ("utf-8", TEXT.encode("utf-8")),
    ("utf-8 with BOM", b"\xef\xbb\xbf" + TEXT.encode("utf-8")),
    ("utf-8 CRLF", TEXT.replace("\n", "\r\n").encode("utf-8")),
    ("utf-16 with BOM", TEXT.encode("utf-16")),
    ("utf-16-be with BOM", b"\xfe\xff" + TEXT.encode("utf-16-be")),
    ("utf-32 with BOM", TEXT.encode("utf-32")),
])
def test_common_text_files_read_the_same(tmp_path, encoding, data):
    path = tmp_path / "script.txt"
    path.write_bytes(data)
    items = parse_script(read_script_file(path))
    assert [seg.lines for seg in items] == [[(0, ' Héllo "there".'), (1, " Grüße!")]], encoding


def test_a_latin1_file_is_read_and_said(tmp_path, caplog):
    path = tmp_path / "latin.txt"
    path.write_bytes("Speaker 1: Grüße, café.".encode("latin-1"))
    with caplog.at_level(logging.WARNING):
        assert parse_script(read_script_file(path))[0].lines == [(0, " Grüße, café.")]
    assert any("Windows-1252" in m and "latin.txt" in m for m in caplog.messages)


@pytest.mark.parametrize("data, words", [("Speaker 1: hi".encode("utf-16-le"), "UTF-16"),
                                         (b"\xff\xfe\x00\xd8\x41\x00", "UTF-16"),
                                         (bytes(range(256)) * 4, "NUL")])
def test_other_bytes_are_refused_naming_the_encoding(tmp_path, data, words):
    path = tmp_path / "odd.txt"
    path.write_bytes(data)
    with pytest.raises(UserError, match=words):
        read_script_file(path)


def test_a_huge_script_file_is_one_line_naming_the_cap(tmp_path):
    """A 13 MB one-token script took 3.6 GB and 29 s in --dry-run; now it is refused before any parsing."""
    from vibevoice_mlx.processor import MAX_SCRIPT_BYTES

    edge = tmp_path / "edge.txt"
    edge.write_bytes(b"Speaker 1: " + b"a" * (MAX_SCRIPT_BYTES - 11))
    assert len(read_script_file(edge)) == MAX_SCRIPT_BYTES  # the cap itself is allowed
    big = tmp_path / "big.txt"
    big.write_bytes(b"x" * (13 << 20))
    r = CliRunner().invoke(main, ["say", "--file", str(big), "--dry-run", "--model", str(tmp_path / "none")])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert str(big) in r.output and "2 MiB" in r.output, r.output


def test_near_miss_labels_are_said_with_their_line(caplog):
    with caplog.at_level(logging.WARNING):
        parse_script("Speaker 1: Hello.\nSpeaker1: typo\nSpeaker 2 no colon\n[1] no colon either")
    near = [m for m in caplog.messages if "looks like a speaker label" in m]
    assert [m.split()[1] for m in near] == ["2", "3", "4"]


def _say(tiny, *args, model=None):
    return CliRunner().invoke(main, ["say", "Speaker 1: Hello.", "--model", str(model or tiny["original"]),
                                     "--tokenizer", str(tiny["tokenizer"]), *map(str, args)])


@pytest.mark.parametrize("damage", ["truncated shard", "empty shard", "corrupt config", "corrupt tokenizer"])
def test_a_damaged_model_folder_is_one_line_naming_the_file(tiny, tmp_path, damage):
    folder = tmp_path / "model"
    shutil.copytree(tiny["original"], folder)
    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(tiny["tokenizer"], tokenizer)
    shard = folder / "model.safetensors"
    name = {"truncated shard": "model.safetensors", "empty shard": "model.safetensors",
            "corrupt config": "config.json", "corrupt tokenizer": "tokenizer.json"}[damage]
    if damage == "truncated shard":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif damage == "empty shard":
        shard.write_bytes(b"")
    elif damage == "corrupt config":
        (folder / "config.json").write_text('{"decoder_config": ')
    else:
        (tokenizer / "tokenizer.json").write_text("{ not json")
    r = CliRunner().invoke(main, ["say", "Speaker 1: Hi.", "--model", str(folder), "--tokenizer", str(tokenizer),
                                  "-o", str(tmp_path / "a.wav")])
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert r.exit_code == 1 and len(errors) == 1 and name in errors[0], (damage, r.output, r.exception)
    assert not (tmp_path / "a.wav").exists()


def test_convert_refuses_a_tokenizer_that_generation_would_refuse(tiny, tmp_path):
    bad = tmp_path / "tok"
    shutil.copytree(tiny["tokenizer"], bad)
    data = json.loads((bad / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|vision_pad|>"]
    (bad / "tokenizer.json").write_text(json.dumps(data))
    r = CliRunner().invoke(main, ["convert", "--model", str(tiny["original"]), "--mlx-path", str(tmp_path / "out"),
                                  "--tokenizer", str(bad)])
    assert r.exit_code == 1 and "<|vision_pad|>" in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "out").exists()


def test_the_torch_backend_without_torch_says_how_to_install(tiny, tmp_path, monkeypatch):
    real = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    r = _say(tiny, "--backend", "torch", "-o", tmp_path / "a.wav")
    assert r.exit_code == 1 and "pip install 'vibevoice-mlx[torch]'" in r.output and "Traceback" not in r.output


def test_memory_preflight_refuses_with_what_fits_and_force_overrides(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(generation, "greedy", lambda logits, ids: ids[2])
    monkeypatch.setattr(preflight, "available_bytes", lambda: 100 << 20)  # 100 MB free
    r = _say(tiny, "-o", tmp_path / "a.wav", "--max-seconds", 0.002)
    assert r.exit_code == 1 and "available: it would swap" in r.output and "-q --q-bits 8" in r.output
    assert "--force" in r.output and not (tmp_path / "a.wav").exists()
    r = _say(tiny, "-o", tmp_path / "a.wav", "--max-seconds", 0.002, "--force")
    assert r.exit_code == 0, r.output


def test_the_estimate_counts_weights_and_both_branches_kv(tiny):
    from vibevoice_mlx.checkpoint import read_checkpoint
    from vibevoice_mlx.models.vibevoice import ModelConfig

    ckpt = read_checkpoint(tiny["original"])
    config = ModelConfig.from_normalized(ckpt.normalized)
    est = preflight.estimate(ckpt, config, "float32", max_tokens=1000)
    params = sum(v.size for v in __import__("safetensors.numpy", fromlist=["load_file"]).load_file(
        str(tiny["original"] / "model.safetensors")).values())
    assert est.weights == 4 * params
    d = config.decoder_config
    assert est.kv_cache == 2 * 2 * d.num_hidden_layers * d.num_key_value_heads * (d.hidden_size // d.num_attention_heads) * 4 * 1000
    assert preflight.estimate(ckpt, config, "float16", 1000).weights == 2 * params


@pytest.fixture(scope="module")
def pipe(tiny):
    return vv.load(tiny["original"], tokenizer=tiny["tokenizer"])


def test_saved_voices_are_not_private_and_notice_another_model(pipe, tiny, tmp_path, caplog):
    clip = 0.2 * np.random.default_rng(1).standard_normal(int(1.2 * 24000)).astype(np.float32)
    path = vv.save_voice(pipe, clip, tmp_path / "v.safetensors")
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == 0o666 & ~umask
    with caplog.at_level(logging.WARNING):
        vv.generate(pipe, "Speaker 1: Hi.", voices=[path], sampler=lambda lg, ids: ids[3])
    assert not any("another model" in m for m in caplog.messages)
    other = vv.load(tiny["original"], tokenizer=tiny["tokenizer"])
    enc = other.model.model.acoustic_tokenizer.encoder.head.conv.conv
    enc.weight = enc.weight * 1.5  # a different model's encoder
    with caplog.at_level(logging.WARNING):
        vv.generate(other, "Speaker 1: Hi.", voices=[path], sampler=lambda lg, ids: ids[3])
    assert any("encoded by another model" in m for m in caplog.messages)


def test_short_voices_are_said(pipe, caplog):
    with caplog.at_level(logging.WARNING):
        vv.generate(pipe, "Speaker 1: Hi.", voices=[np.ones(2400, np.float32) * 0.1], sampler=lambda lg, ids: ids[3])
    assert any("only 0.10 s long" in m for m in caplog.messages)


@pytest.mark.parametrize("option, value", [("seed", -1), ("seed", 2**70), ("cfg_scale", float("nan")),
                                           ("steps", 0), ("top_p", 0), ("max_seconds", float("inf")),
                                           ("temperature", -0.5)])
def test_every_option_is_range_checked(pipe, option, value):
    with pytest.raises(UserError, match=option):
        vv.generate(pipe, "Speaker 1: Hi.", **{option: value})


def test_a_voice_file_that_is_not_audio(pipe, tmp_path):
    bad = tmp_path / "notes.wav"
    bad.write_text("these are my notes")
    with pytest.raises(UserError, match="notes.wav"):
        vv.generate(pipe, "Speaker 1: Hi.", voices=[bad])
    sf.write(tmp_path / "quiet.wav", np.zeros(48000, np.float32), 24000)
    with pytest.raises(UserError, match="silent"):
        vv.generate(pipe, "Speaker 1: Hi.", voices=[tmp_path / "quiet.wav"])


def test_a_lone_surrogate_is_a_user_error_not_a_tokenizer_crash():
    with pytest.raises(UserError, match="U\\+D800"):
        parse_script("Speaker 1: hi \ud800 there")
