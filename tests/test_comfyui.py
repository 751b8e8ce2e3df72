"""The ComfyUI nodes, tested the way ComfyUI uses them (ComfyUI itself cannot be installed here).

The loader folder is written by the real `comfyui install` command and imported as ComfyUI's custom-node loader
does; `folder_paths` and `comfy.*` are small fakes with ComfyUI's signatures; AUDIO values are built as ComfyUI's
Load Audio node builds them. Generation runs on the tiny model with speech frames forced through `sampler`.
"""

import importlib.util
import json
import logging
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import vibevoice_mlx as vv
from vibevoice_mlx.comfyui import install as inst
from vibevoice_mlx.comfyui import models
from vibevoice_mlx.comfyui.models import MODELS

NODE_IDS = ["VibeVoiceSingleSpeakerNode", "VibeVoiceMultipleSpeakersNode", "VibeVoiceFreeMemoryNode",
            "VibeVoiceSaveVoiceNode", "LoadTextFromFileNode", "VibeVoiceRealtimeNode"]
README = Path(__file__).resolve().parents[1] / "README.md"


def make_root(path: Path) -> Path:
    for sub in ("custom_nodes", "models/vibevoice", "input", "output", "temp"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    return path


def fake_folder_paths(root: Path) -> types.ModuleType:
    """ComfyUI's folder_paths, as much of it as custom nodes use (same names, signatures and KeyError)."""
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(root / "models")
    fp.folder_names_and_paths = {}

    def add_model_folder_path(folder_name, full_folder_path, is_default=False):
        paths = fp.folder_names_and_paths.setdefault(folder_name, ([], set()))[0]
        if full_folder_path not in paths:
            paths.insert(0, full_folder_path) if is_default else paths.append(full_folder_path)

    fp.add_model_folder_path = add_model_folder_path
    fp.get_folder_paths = lambda folder_name: fp.folder_names_and_paths[folder_name][0][:]
    fp.get_input_directory = lambda: str(root / "input")
    fp.get_output_directory = lambda: str(root / "output")
    fp.get_temp_directory = lambda: str(root / "temp")
    return fp


@pytest.fixture
def in_comfyui(monkeypatch, tmp_path):
    """Run inside a fake ComfyUI: returns a function that makes `root` the ComfyUI folder."""
    monkeypatch.setenv("VIBEVOICE_MLX_CACHE", str(tmp_path / "cache"))

    def enter(root: Path):
        fp = fake_folder_paths(root)
        monkeypatch.setitem(sys.modules, "folder_paths", fp)
        models.register_model_folder()
        return fp

    return enter


def load_custom_node(folder: Path, monkeypatch):
    """What ComfyUI's nodes.load_custom_node does with a custom_nodes/ folder."""
    spec = importlib.util.spec_from_file_location(folder.name, folder / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, folder.name, module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def nodes(tmp_path, monkeypatch):
    """The node classes as ComfyUI sees them, through the installed loader."""
    root = make_root(tmp_path / "ComfyUI")
    result = CliRunner().invoke(inst.comfyui, ["install", str(root)])
    assert result.exit_code == 0, result.output
    module = load_custom_node(root / "custom_nodes" / inst.LOADER_NAME, monkeypatch)
    return {name: cls() for name, cls in module.NODE_CLASS_MAPPINGS.items()}


# --- install ---------------------------------------------------------------------------------------------------


def test_install_writes_a_tiny_loader_that_comfyui_loads(tmp_path, monkeypatch):
    root = make_root(tmp_path / "ComfyUI")
    result = CliRunner().invoke(inst.comfyui, ["install", str(root)])
    assert result.exit_code == 0 and "Installed" in result.output
    folder = root / "custom_nodes" / inst.LOADER_NAME
    assert sorted(p.name for p in folder.iterdir()) == ["__init__.py"]
    source = (folder / "__init__.py").read_text()
    assert len(source.splitlines()) < 25 and "from vibevoice_mlx.comfyui import" in source
    module = load_custom_node(folder, monkeypatch)
    assert list(module.NODE_CLASS_MAPPINGS) == NODE_IDS
    assert set(module.NODE_DISPLAY_NAME_MAPPINGS) == set(NODE_IDS)
    assert module.NODE_DISPLAY_NAME_MAPPINGS["VibeVoiceSaveVoiceNode"] == "VibeVoice Save Voice"
    # Installing again replaces our own loader without --force.
    assert CliRunner().invoke(inst.comfyui, ["install", str(root)]).exit_code == 0


def test_install_creates_the_model_folder_convert_writes_into(tmp_path):
    root = tmp_path / "ComfyUI"  # as a fresh ComfyUI comes: no models/vibevoice/
    for sub in ("custom_nodes", "models/checkpoints"):
        (root / sub).mkdir(parents=True)
    result = CliRunner().invoke(inst.comfyui, ["install", str(root)])
    assert result.exit_code == 0 and f"Convert models into {root / 'models' / 'vibevoice'}/" in result.output
    assert (root / "models" / "vibevoice").is_dir()


def _comfyui_process(before: str = "") -> subprocess.CompletedProcess:
    """Import the nodes as ComfyUI does (a `folder_paths` module exists), then MLX, in a fresh process; print the
    BLAS MLX runs on and the system BLAS there is. `before` runs first (another node pack)."""
    code = ("import sys, types\n"
            "fp = types.ModuleType('folder_paths'); fp.models_dir = 'models'\n"
            "fp.add_model_folder_path = lambda *a, **k: None; sys.modules['folder_paths'] = fp\n"
            f"{before}\n"
            "import vibevoice_mlx.comfyui\n"
            "import mlx.core\n"
            "from vibevoice_mlx import blas\n"
            "print(blas.active_blas()['path']); print(blas.find_system_blas())\n")
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("LD_PRELOAD", "VIBEVOICE_MLX_BLAS")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.skipif(sys.platform != "linux", reason="the fast BLAS is loaded on Linux only")
def test_nodes_give_mlx_the_system_blas_inside_comfyui():
    r = _comfyui_process()
    assert r.returncode == 0, r.stderr
    active, system = r.stdout.split()
    if system != "None":  # the system has BLIS or OpenBLAS: MLX runs on it, as under the vibevoice-mlx command
        assert active == system, r.stdout
    else:  # it has none: the log says what to install
        assert "apt-get install libblis4-pthread" in r.stderr
    # Another node pack imported MLX first: too late to swap, and the log says how to start ComfyUI instead.
    r = _comfyui_process("import mlx.core")
    assert r.returncode == 0 and "mlx_cpu.libs" in r.stdout.split()[0], r.stdout
    if system != "None":
        assert "another node pack imported MLX first" in r.stderr and f"LD_PRELOAD={system} python main.py" in r.stderr


def test_install_refuses_a_folder_that_is_not_comfyui(tmp_path):
    result = CliRunner().invoke(inst.comfyui, ["install", str(tmp_path)])
    assert result.exit_code == 1
    assert "no custom_nodes/" in result.output and len(result.output.strip().splitlines()) == 1


def test_install_and_uninstall_leave_a_foreign_folder_alone_without_force(tmp_path):
    root = make_root(tmp_path / "ComfyUI")
    foreign = root / "custom_nodes" / inst.LOADER_NAME
    foreign.mkdir()
    (foreign / "__init__.py").write_text("NODE_CLASS_MAPPINGS = {}\n")
    for args in (["install", str(root)], ["install", str(root), "--uninstall"]):
        result = CliRunner().invoke(inst.comfyui, args)
        assert result.exit_code == 1 and "--force" in result.output
        assert (foreign / "__init__.py").read_text() == "NODE_CLASS_MAPPINGS = {}\n"
    assert CliRunner().invoke(inst.comfyui, ["install", str(root), "--force"]).exit_code == 0
    assert inst.is_loader(foreign)
    (foreign / "notes.txt").write_text("mine")  # a file of the user's makes the folder theirs again
    assert CliRunner().invoke(inst.comfyui, ["install", str(root), "--uninstall"]).exit_code == 1
    (foreign / "notes.txt").unlink()
    result = CliRunner().invoke(inst.comfyui, ["install", str(root), "--uninstall"])
    assert result.exit_code == 0 and not foreign.exists()
    result = CliRunner().invoke(inst.comfyui, ["install", str(root), "--uninstall"])
    assert result.exit_code == 1 and "Nothing to remove" in result.output


def test_install_warns_when_comfyuis_python_lacks_the_package(tmp_path):
    root = make_root(tmp_path / "ComfyUI")
    python = root / "venv" / "bin" / "python"  # stands in for a ComfyUI venv without vibevoice-mlx
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\nexit 1\n")
    python.chmod(0o755)
    result = CliRunner().invoke(inst.comfyui, ["install", str(root)])
    assert result.exit_code == 0
    assert f"{python} cannot import vibevoice_mlx" in result.output and "-m pip install" in result.output
    python.write_text("#!/bin/sh\nexit 0\n")  # one that has it: no warning
    assert "cannot import" not in CliRunner().invoke(inst.comfyui, ["install", str(root)]).output


def test_loader_says_how_to_fix_a_missing_package(tmp_path, monkeypatch):
    root = make_root(tmp_path / "ComfyUI")
    folder = inst.install_loader(root)
    # What ComfyUI's Python without vibevoice-mlx sees:
    monkeypatch.setitem(sys.modules, "vibevoice_mlx", None)
    monkeypatch.setitem(sys.modules, "vibevoice_mlx.comfyui", None)
    with pytest.raises(ImportError, match=r"not installed in the Python that runs ComfyUI .* -m pip install"):
        load_custom_node(folder, monkeypatch)


def test_import_needs_neither_torch_nor_comfyui():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import vibevoice_mlx.comfyui as c\n"
            "types = {k: v.INPUT_TYPES() for k, v in c.NODE_CLASS_MAPPINGS.items()}\n"
            "print(len(types), 'torch' in sys.modules and sys.modules['torch'] is not None)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["6", "False"]


# --- the node contract -----------------------------------------------------------------------------------------

REQUIRED = ["text", "model", "attention_type", "quantize_llm", "free_memory_after_generate", "diffusion_steps",
            "seed", "cfg_scale", "use_sampling"]


def test_speech_nodes_inputs_match_the_packs(nodes):
    for name, voices in [("VibeVoiceSingleSpeakerNode", ["voice_to_clone"]),
                         ("VibeVoiceMultipleSpeakersNode", [f"speaker{i}_voice" for i in range(1, 5)])]:
        node = nodes[name]
        types_ = type(node).INPUT_TYPES()
        req, opt = types_["required"], types_["optional"]
        assert list(req) == REQUIRED and list(opt) == voices + ["temperature", "top_p"]
        assert req["text"][0] == "STRING" and req["text"][1]["multiline"] is True
        assert "microsoft/VibeVoice-1.5B" in req["model"][0] and req["model"][1]["default"] in req["model"][0]
        assert req["attention_type"][0] == ["auto", "eager", "sdpa", "flash_attention_2", "sage"]
        assert req["quantize_llm"][0] == ["full precision", "4bit", "8bit"]
        assert req["free_memory_after_generate"] == ("BOOLEAN", req["free_memory_after_generate"][1])
        assert req["free_memory_after_generate"][1]["default"] is True
        steps = req["diffusion_steps"][1]
        assert req["diffusion_steps"][0] == "INT" and (steps["default"], steps["min"], steps["max"]) == (10, 1, 100)
        seed = req["seed"][1]
        assert req["seed"][0] == "INT" and (seed["default"], seed["min"], seed["max"]) == (42, 0, 2**32 - 1)
        cfg = req["cfg_scale"][1]
        assert req["cfg_scale"][0] == "FLOAT" and cfg["default"] == 1.3 and cfg["min"] <= 1.0 < 3.0 <= cfg["max"]
        assert req["use_sampling"][0] == "BOOLEAN" and req["use_sampling"][1]["default"] is False
        assert all(opt[v][0] == "AUDIO" for v in voices)
        assert opt["temperature"][0] == "FLOAT" and opt["top_p"][0] == "FLOAT" and opt["top_p"][1]["max"] == 1.0
        assert node.RETURN_TYPES == ("AUDIO",) and node.FUNCTION == "generate_speech"
        assert node.CATEGORY == "VibeVoice" and callable(getattr(node, node.FUNCTION))


def test_other_nodes_inputs_and_outputs(nodes):
    want = {
        "VibeVoiceFreeMemoryNode": ({"audio": "AUDIO"}, ("AUDIO",), "free_vibevoice_memory"),
        "VibeVoiceSaveVoiceNode": ({"audio": "AUDIO", "model": list, "name": "STRING", "overwrite": "BOOLEAN"},
                                   ("STRING",), "save_voice"),
        "LoadTextFromFileNode": ({"file": list}, ("STRING",), "load_text"),
    }
    for name, (inputs, returns, function) in want.items():
        node = nodes[name]
        req = type(node).INPUT_TYPES()["required"]
        assert {k: type(v[0]) if isinstance(v[0], list) else v[0] for k, v in req.items()} == inputs
        assert node.RETURN_TYPES == returns and node.FUNCTION == function and node.CATEGORY == "VibeVoice"
        assert callable(getattr(node, function))
    assert getattr(nodes["VibeVoiceSaveVoiceNode"], "OUTPUT_NODE", False) is True


def test_model_list_inside_comfyui(tmp_path, in_comfyui):
    root = make_root(tmp_path / "ComfyUI")
    fp = in_comfyui(root)
    assert fp.get_folder_paths("vibevoice") == [str(root / "models" / "vibevoice")]

    def folder(path: Path, config: dict, weights: str = "model.safetensors"):
        path.mkdir(parents=True)
        (path / "config.json").write_text(json.dumps(config))
        (path / weights).write_bytes(b"")

    here = root / "models" / "vibevoice"
    folder(here / "VibeVoice-1.5B-mlx", {"conversion": {"source": "microsoft/VibeVoice-1.5B"}})
    folder(here / "VibeVoice-Large", {"model_type": "vibevoice"}, "model-00001-of-00002.safetensors")
    folder(here / "some-llm", {"model_type": "llama"})
    (here / "voices").mkdir()
    folder(tmp_path / "cache" / "models" / "cached-model", {"conversion": {"source": "x/y"}})
    assert list(models.available_models()) == ["VibeVoice-1.5B-mlx", "VibeVoice-Large", "cached-model",
                                               "microsoft/VibeVoice-1.5B"]
    assert models.resolve_entry("VibeVoice-Large") == str(here / "VibeVoice-Large")
    assert models.resolve_entry("microsoft/VibeVoice-1.5B") == "microsoft/VibeVoice-1.5B"
    with pytest.raises(ValueError, match="not found: convert one into"):
        models.resolve_entry("no-such-model")


def test_load_text_from_file(nodes, tmp_path, in_comfyui):
    root = make_root(tmp_path / "text-root")
    in_comfyui(root)
    (root / "input" / "script.txt").write_text("[1]: Hello.\n[2]: Hi!\n", encoding="utf-8")
    (root / "output" / "empty.txt").write_text("  \n")
    (root / "input" / "image.png").write_bytes(b"\x89PNG")
    node = nodes["LoadTextFromFileNode"]
    assert type(node).INPUT_TYPES()["required"]["file"][0] == ["input/script.txt", "output/empty.txt"]
    assert node.load_text("input/script.txt") == ("[1]: Hello.\n[2]: Hi!\n",)
    before = type(node).IS_CHANGED("input/script.txt")
    (root / "input" / "script.txt").write_text("[1]: Changed.\n")
    assert type(node).IS_CHANGED("input/script.txt") != before
    with pytest.raises(ValueError, match="empty"):
        node.load_text("output/empty.txt")
    with pytest.raises(FileNotFoundError, match="not found"):
        node.load_text("input/missing.txt")


# --- generation on the tiny model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_root(tiny, tmp_path_factory):
    """A ComfyUI folder with the tiny model converted into models/vibevoice/vv-tiny (tokenizer bundled)."""
    root = make_root(tmp_path_factory.mktemp("comfy") / "ComfyUI")
    models._convert()(str(tiny["original"]), str(root / "models" / "vibevoice" / "vv-tiny"), dtype="float32",
               tokenizer=str(tiny["tokenizer"]))
    return root


@pytest.fixture
def comfy_tiny(in_comfyui, tiny_root):
    in_comfyui(tiny_root)
    yield tiny_root
    MODELS.release()


def tiny_source(root: Path) -> str:
    """The PyTorch checkpoint the converted tiny model records as its source."""
    return json.loads((root / "models" / "vibevoice" / "vv-tiny" / "config.json").read_text())["conversion"]["source"]


def forced(frames: int):
    """A sampler that makes `frames` speech frames, then ends the speech and the script (ids: start, end,
    diffusion, eos)."""
    calls = []

    def sampler(logits, ids):
        calls.append(len(calls))
        n = len(calls)
        return ids[2] if n <= frames else ids[1] if n == frames + 1 else ids[3]

    sampler.calls = calls
    return sampler


def comfy_audio(samples: int, rate: int, channels: int, seed: int = 0):
    """An AUDIO value as ComfyUI's Load Audio node makes it."""
    import torch

    wave = torch.from_numpy(np.random.default_rng(seed).uniform(-0.5, 0.5, (1, channels, samples)).astype(np.float32))
    return {"waveform": wave, "sample_rate": rate}


def check_audio(audio, samples: int):
    import torch

    assert set(audio) == {"waveform", "sample_rate"} and audio["sample_rate"] == 24000
    wave = audio["waveform"]
    assert isinstance(wave, torch.Tensor) and wave.dtype == torch.float32
    assert tuple(wave.shape) == (1, 1, samples) and bool(torch.isfinite(wave).all())
    assert float(wave.abs().max()) > 0


KW = dict(attention_type="auto", quantize_llm="full precision", diffusion_steps=2, seed=1, cfg_scale=1.3,
          use_sampling=False)


@pytest.mark.needs_torch
def test_single_speaker_clones_a_stereo_44k_voice(nodes, comfy_tiny):
    node = nodes["VibeVoiceSingleSpeakerNode"]
    hop = 16  # the tiny model's samples per frame
    (audio,) = node.generate_speech("Hello there.", "vv-tiny", free_memory_after_generate=False,
                                    voice_to_clone=comfy_audio(2205, 44100, 2), sampler=forced(5), **KW)
    check_audio(audio, 5 * hop)
    assert MODELS.pipe is not None and MODELS.pipe.hop_length == hop  # kept for the next run
    (again,) = node.generate_speech("Hello there.", "vv-tiny", free_memory_after_generate=True,
                                    voice_to_clone=comfy_audio(2205, 44100, 2), sampler=forced(5), **KW)
    assert np.array_equal(again["waveform"].numpy(), audio["waveform"].numpy())  # same seed, same model
    assert MODELS.pipe is None  # the option released it


@pytest.mark.needs_torch
def test_multiple_speakers_take_voices_in_order(nodes, comfy_tiny):
    node = nodes["VibeVoiceMultipleSpeakersNode"]
    text = "[1]: Hi Bob.\n[2]: Hi Alice!"
    (audio,) = node.generate_speech(text, "vv-tiny", free_memory_after_generate=False,
                                    speaker1_voice=comfy_audio(800, 16000, 1),
                                    speaker2_voice=comfy_audio(4800, 48000, 2, seed=1), sampler=forced(3), **KW)
    check_audio(audio, 3 * 16)
    with pytest.raises(ValueError, match="speaker2_voice not connected"):
        node.generate_speech(text, "vv-tiny", speaker1_voice=comfy_audio(800, 16000, 1),
                             speaker3_voice=comfy_audio(800, 16000, 1), sampler=forced(3), **KW)
    with pytest.raises(ValueError, match="2 speakers but only 1 voice"):
        node.generate_speech(text, "vv-tiny", free_memory_after_generate=False,
                             speaker1_voice=comfy_audio(800, 16000, 1), sampler=forced(3), **KW)


@pytest.mark.needs_torch
def test_use_sampling_decides_temperature_and_top_p(nodes, comfy_tiny, monkeypatch):
    seen = []
    real = vv.stream_generate

    def spy(pipe, script, **kw):
        seen.append((kw["temperature"], kw["top_p"], kw["steps"], kw["cfg_scale"], kw["seed"]))
        return real(pipe, script, **kw)

    monkeypatch.setattr(vv, "stream_generate", spy)
    node = nodes["VibeVoiceSingleSpeakerNode"]
    args = dict(KW, free_memory_after_generate=False, temperature=0.7, top_p=0.8, sampler=forced(2))
    node.generate_speech("Hi.", "vv-tiny", **args)
    node.generate_speech("Hi.", "vv-tiny", **dict(args, use_sampling=True, sampler=forced(2)))
    assert seen == [(0.0, 1.0, 2, 1.3, 1), (0.7, 0.8, 2, 1.3, 1)]


def fake_comfy(monkeypatch, interrupt_after=None):
    """comfy.utils.ProgressBar and comfy.model_management's interrupt check, recording what they are told."""
    log = {"bars": [], "checks": 0}

    class ProgressBar:
        def __init__(self, total):
            self.total, self.updates = total, []
            log["bars"].append(self)

        def update_absolute(self, value, total=None):
            self.updates.append((value, total))

    class InterruptProcessingException(Exception):
        pass

    def throw_exception_if_processing_interrupted():
        log["checks"] += 1
        if interrupt_after is not None and log["checks"] > interrupt_after:
            raise InterruptProcessingException()

    comfy = types.ModuleType("comfy")
    comfy.utils = types.ModuleType("comfy.utils")
    comfy.utils.ProgressBar = ProgressBar
    comfy.model_management = types.ModuleType("comfy.model_management")
    comfy.model_management.InterruptProcessingException = InterruptProcessingException
    comfy.model_management.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    for module in (comfy, comfy.utils, comfy.model_management):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    return log, InterruptProcessingException


@pytest.mark.needs_torch
def test_progress_bar_follows_the_frames(nodes, comfy_tiny, monkeypatch):
    log, _ = fake_comfy(monkeypatch)
    nodes["VibeVoiceSingleSpeakerNode"].generate_speech("Hello there.", "vv-tiny", free_memory_after_generate=False,
                                                         sampler=forced(4), **KW)
    (bar,) = log["bars"]
    total = bar.total
    assert bar.updates == [(1, total), (2, total), (3, total), (4, total), (total, total)] and total > 4
    assert log["checks"] >= 6  # once per language-model step: 4 frames, speech end, eos


@pytest.mark.needs_torch
def test_interrupt_stops_generation_at_the_next_frame(nodes, comfy_tiny, monkeypatch):
    log, interrupted = fake_comfy(monkeypatch, interrupt_after=3)
    sampler = forced(50)
    with pytest.raises(interrupted):
        nodes["VibeVoiceSingleSpeakerNode"].generate_speech("Hello there.", "vv-tiny",
                                                             free_memory_after_generate=True, sampler=sampler, **KW)
    assert len(sampler.calls) == 4  # the step after the third check raised, and no step ran after it
    assert [u[0] for u in log["bars"][0].updates] == [1, 2, 3]
    assert MODELS.pipe is None  # released even though the run was cancelled


@pytest.mark.needs_torch
def test_free_memory_node_releases_and_passes_audio_through(nodes, comfy_tiny):
    nodes["VibeVoiceSingleSpeakerNode"].generate_speech("Hi.", "vv-tiny", free_memory_after_generate=False,
                                                         sampler=forced(1), **KW)
    assert MODELS.pipe is not None
    audio = comfy_audio(100, 24000, 1)
    (out,) = nodes["VibeVoiceFreeMemoryNode"].free_vibevoice_memory(audio)
    assert out is audio and MODELS.pipe is None


@pytest.mark.needs_torch
def test_save_voice_node_writes_a_reusable_voice(nodes, comfy_tiny):
    node = nodes["VibeVoiceSaveVoiceNode"]
    (path,) = node.save_voice(comfy_audio(4410, 44100, 2), "vv-tiny", name="alice", overwrite=False)
    assert Path(path) == comfy_tiny / "models" / "vibevoice" / "voices" / "alice.safetensors" and Path(path).is_file()
    with pytest.raises(FileExistsError, match="turn on overwrite"):
        node.save_voice(comfy_audio(4410, 44100, 2), "vv-tiny", name="alice", overwrite=False)
    assert node.save_voice(comfy_audio(4410, 44100, 2, seed=3), "vv-tiny", name="alice", overwrite=True) == (path,)
    with pytest.raises(ValueError, match="Voice name"):
        node.save_voice(comfy_audio(100, 24000, 1), "vv-tiny", name="../escape")
    # The listing skips the voices folder, and the voice generates like a sample would.
    assert "voices" not in models.available_models()
    result = vv.generate(MODELS.get("vv-tiny"), "Speaker 1: Hi.", voices=[path], sampler=forced(2), seed=0)
    assert result.audio.shape == (2 * 16,)


@pytest.mark.needs_torch
def test_quantize_llm_uses_a_converted_model(nodes, comfy_tiny, tmp_path, monkeypatch, caplog):
    node = nodes["VibeVoiceSingleSpeakerNode"]
    args = dict(KW, quantize_llm="8bit", free_memory_after_generate=False)
    (audio,) = node.generate_speech("Hi.", "vv-tiny", sampler=forced(2), **args)
    check_audio(audio, 2 * 16)
    target = tmp_path / "cache" / "models" / "vv-tiny-8bit"  # converted once into the cache
    assert MODELS.pipe.folder == target
    assert json.loads((target / "config.json").read_text())["quantization"]["bits"] == 8
    MODELS.release()
    # A converted <name>-4bit folder beside the model is used as it is.
    beside = comfy_tiny / "models" / "vibevoice" / "vv-tiny-4bit"
    if not beside.exists():
        models._convert()(tiny_source(comfy_tiny), str(beside), quantize=True, q_bits=4,
                   tokenizer=str(comfy_tiny / "models" / "vibevoice" / "vv-tiny"))
    monkeypatch.setattr(vv, "convert", lambda *a, **k: pytest.fail("converted again"))
    node.generate_speech("Hi.", "vv-tiny", sampler=forced(2), **args)
    assert MODELS.pipe.folder == target
    node.generate_speech("Hi.", "vv-tiny", sampler=forced(2), **dict(args, quantize_llm="4bit"))
    assert MODELS.pipe.folder == beside
    # An already quantized model ignores quantize_llm, and says so.
    with caplog.at_level(logging.WARNING):
        node.generate_speech("Hi.", "vv-tiny-4bit", sampler=forced(2), **args)
    assert MODELS.pipe.folder == beside and any("already has a 4-bit" in m for m in caplog.messages)


@pytest.mark.needs_torch
def test_user_errors_are_one_line(nodes, comfy_tiny):
    node = nodes["VibeVoiceSingleSpeakerNode"]
    cases = [(dict(text="  "), "No text to speak"), (dict(model="nope"), "not found"),
             (dict(voice_to_clone=[0.1, 0.2]), "not an AUDIO value"),
             (dict(voice_to_clone={"waveform": np.zeros((1, 1, 0), np.float32), "sample_rate": 24000}),
              "at least one sample")]
    for override, message in cases:
        args = dict(dict(text="Hi.", model="vv-tiny"), **override)
        with pytest.raises(ValueError, match=message) as e:
            node.generate_speech(args.pop("text"), args.pop("model"), sampler=forced(1), **args, **KW)
        assert "\n" not in str(e.value)


@pytest.mark.needs_torch
def test_torch_backend_when_asked(nodes, comfy_tiny, monkeypatch):
    loads = []
    real = vv.load

    def spy(path, **kw):
        loads.append((str(path), kw))
        return real(path, **kw)

    monkeypatch.setattr(vv, "load", spy)
    monkeypatch.setenv("VIBEVOICE_MLX_COMFYUI_BACKEND", "torch")
    node = nodes["VibeVoiceSingleSpeakerNode"]
    args = dict(KW, attention_type="flash_attention_2", quantize_llm="4bit", free_memory_after_generate=False)
    (audio,) = node.generate_speech("Hello.", "vv-tiny", sampler=forced(3), **args)
    check_audio(audio, 3 * 16)
    # The PyTorch checkpoint the converted folder came from, its bundled tokenizer, CUDA-only kernels as auto and
    # no quantization (bitsandbytes is CUDA-only).
    (path, kw), = loads
    converted = comfy_tiny / "models" / "vibevoice" / "vv-tiny"
    assert path == tiny_source(comfy_tiny)
    assert kw == {"backend": "torch", "attention": "auto", "tokenizer": str(converted)}
    monkeypatch.setenv("VIBEVOICE_MLX_COMFYUI_BACKEND", "cuda")
    with pytest.raises(ValueError, match="set it to mlx or torch"):
        node.generate_speech("Hello.", "vv-tiny", sampler=forced(3), **args)


# --- the README's example workflow -----------------------------------------------------------------------------


def readme_workflow() -> dict:
    section = README.read_text().split("## ComfyUI", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```json\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the ComfyUI section should hold one workflow JSON block"
    return json.loads(blocks[0])


def test_readme_workflow_is_valid_for_the_nodes(nodes):
    """Every node of ours in the README's API-format workflow gets exactly the inputs it declares, with valid
    values; links point at existing nodes whose outputs have the input's type."""
    workflow = readme_workflow()
    core_outputs = {"LoadAudio": ("AUDIO",), "SaveAudio": (), "PreviewAudio": ()}
    ours = {k: type(v) for k, v in nodes.items()}
    used = set()
    for node_id, node in workflow.items():
        cls = node["class_type"]
        assert cls in ours or cls in core_outputs, f"node {node_id}: unknown class {cls}"
        if cls not in ours:
            continue
        used.add(cls)
        spec = ours[cls].INPUT_TYPES()
        declared = {**spec["required"], **spec.get("optional", {})}
        assert set(spec["required"]) <= set(node["inputs"]) <= set(declared), f"node {node_id} ({cls})"
        for name, value in node["inputs"].items():
            kind, options = declared[name][0], declared[name][1]
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):  # a link
                source = workflow[value[0]]["class_type"]
                outputs = ours[source].RETURN_TYPES if source in ours else core_outputs[source]
                assert outputs[value[1]] == kind, f"node {node_id}: {name} linked to a {outputs[value[1]]}"
            elif isinstance(kind, list) and name not in ("model", "file"):  # those list this machine's files
                assert value in kind, f"node {node_id}: {name}={value!r}"
            elif kind in ("INT", "FLOAT"):
                assert options.get("min", value) <= value <= options.get("max", value), f"{node_id}: {name}"
    assert {"VibeVoiceMultipleSpeakersNode", "LoadTextFromFileNode"} <= used
