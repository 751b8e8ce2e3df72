"""The VibeVoice Realtime (MLX) node and ComfyUI's "Unload Models" releasing our pipeline.

As in test_comfyui.py, the nodes come through the installed loader and ComfyUI's modules are small fakes. The fake
`comfy.model_management` is a condensed copy of ComfyUI 0.3.64's own (`LoadedModel`, `current_loaded_models`,
`load_models_gpu`, `free_memory`, `unload_all_models`, `cleanup_models`): the same calls in the same order, so the
entry we register is handled as ComfyUI handles it. The realtime model is the tiny one of tests/data/realtime_tiny
in its original layout, with the tokenizer files beside its config (convert does not take the realtime family yet).
"""

import shutil
import sys
import types
import weakref

import mlx.core as mx
import numpy as np
import pytest

from test_comfyui import (KW, check_audio, comfy_tiny, fake_comfy, forced, in_comfyui, make_root,  # noqa: F401
                          nodes, tiny_root)  # the fixtures are used by name
from vibevoice_mlx.comfyui.models import MODELS
from vibevoice_mlx.testing import REALTIME_TINY

HOP = 3200  # the tiny realtime model keeps the real ratios


@pytest.fixture
def rt_root(tmp_path, in_comfyui):  # noqa: F811
    """A ComfyUI folder with the tiny realtime model (tokenizer beside it), a fake converted 1.5B folder, and the
    tiny voice preset dropped into the preset folder as `tiny-voice`."""
    root = make_root(tmp_path / "ComfyUI")
    folder = root / "models" / "vibevoice" / "rt-tiny"
    shutil.copytree(REALTIME_TINY / "model", folder)
    for f in (REALTIME_TINY / "tokenizer").iterdir():
        shutil.copy(f, folder)
    other = root / "models" / "vibevoice" / "VibeVoice-1.5B-mlx"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "vibevoice", "conversion": {"source": "x/y"}}')
    (other / "model.safetensors").write_bytes(b"")
    presets = tmp_path / "cache" / "realtime-voices"
    presets.mkdir(parents=True)
    shutil.copy(REALTIME_TINY / "voice.pt", presets / "tiny-voice.pt")
    in_comfyui(root)
    yield root
    MODELS.release()


def stops_after(frames: int):
    """An eos_rule that ends speech after `frames` frames (random weights stop at random)."""
    return lambda frame, probability: frame >= frames - 1


ARGS = dict(cfg_scale=1.5, diffusion_steps=2, seed=1)


def test_realtime_node_inputs(nodes, rt_root):  # noqa: F811
    node = nodes["VibeVoiceRealtimeNode"]
    req = type(node).INPUT_TYPES()["required"]
    assert list(req) == ["text", "model", "voice", "cfg_scale", "diffusion_steps", "seed",
                         "free_memory_after_generate"]
    assert req["text"][0] == "STRING" and req["text"][1]["multiline"] is True
    assert req["model"][0] == ["rt-tiny"] and req["model"][1]["default"] == "rt-tiny"
    voices = req["voice"][0]
    assert voices[:3] == ["de-Spk0_man", "de-Spk1_woman", "en-Carter_man"] and voices[-1] == "tiny-voice"
    assert len(voices) == 26 and req["voice"][1]["default"] == "en-Carter_man"
    assert req["cfg_scale"][0] == "FLOAT" and req["cfg_scale"][1]["default"] == 1.5
    steps = req["diffusion_steps"][1]
    assert req["diffusion_steps"][0] == "INT" and (steps["default"], steps["min"]) == (5, 1)
    assert req["seed"][0] == "INT" and req["seed"][1]["max"] == 2**32 - 1
    assert node.RETURN_TYPES == ("AUDIO",) and node.FUNCTION == "generate_speech" and node.CATEGORY == "VibeVoice"
    # Each family's nodes list only their own models.
    single = type(nodes["VibeVoiceSingleSpeakerNode"]).INPUT_TYPES()["required"]["model"][0]
    assert single == ["VibeVoice-1.5B-mlx", "microsoft/VibeVoice-1.5B"]
    assert type(nodes["VibeVoiceSaveVoiceNode"]).INPUT_TYPES()["required"]["model"][0] == single


def test_realtime_node_without_a_model_says_where_to_put_one(nodes, tmp_path, in_comfyui):  # noqa: F811
    in_comfyui(make_root(tmp_path / "empty"))
    node = nodes["VibeVoiceRealtimeNode"]
    (choice,) = type(node).INPUT_TYPES()["required"]["model"][0]
    with pytest.raises(ValueError, match="No VibeVoice-Realtime-0.5B model in .*put the"):
        node.generate_speech("Hi.", choice, "tiny-voice", **ARGS)


@pytest.mark.needs_torch
def test_realtime_node_speaks_a_preset(nodes, rt_root):
    node = nodes["VibeVoiceRealtimeNode"]
    (audio,) = node.generate_speech("Hello there.", "rt-tiny", "tiny-voice", eos_rule=stops_after(3), **ARGS)
    check_audio(audio, 3 * HOP)
    assert MODELS.pipe is not None and MODELS.pipe.family == "realtime"  # kept for the next run by default
    (again,) = node.generate_speech("Hello there.", "rt-tiny", "tiny-voice", free_memory_after_generate=True,
                                    eos_rule=stops_after(3), **ARGS)
    assert np.array_equal(again["waveform"].numpy(), audio["waveform"].numpy())  # same seed, same speech
    assert MODELS.pipe is None
    (other,) = node.generate_speech("Hello there.", "rt-tiny", "tiny-voice", eos_rule=stops_after(3),
                                    **dict(ARGS, seed=2))
    assert not np.array_equal(other["waveform"].numpy(), audio["waveform"].numpy())


@pytest.mark.needs_torch
def test_realtime_node_passes_its_settings(nodes, rt_root, monkeypatch):
    import vibevoice_mlx as vv

    seen = []
    real = vv.stream_generate

    def spy(pipe, script, **kw):
        seen.append((script, kw["voices"], kw["steps"], kw["cfg_scale"], kw["seed"]))
        return real(pipe, script, **kw)

    monkeypatch.setattr(vv, "stream_generate", spy)
    nodes["VibeVoiceRealtimeNode"].generate_speech("Hi.", "rt-tiny", "tiny-voice", cfg_scale=2.0, diffusion_steps=3,
                                                   seed=7, eos_rule=stops_after(1))
    assert seen == [("Hi.", ["tiny-voice"], 3, 2.0, 7)]


@pytest.mark.needs_torch
def test_realtime_node_progress_and_interrupt(nodes, rt_root, monkeypatch):
    log, _ = fake_comfy(monkeypatch)
    node = nodes["VibeVoiceRealtimeNode"]
    node.generate_speech("Hello there.", "rt-tiny", "tiny-voice", eos_rule=stops_after(2), **ARGS)
    (bar,) = log["bars"]
    assert [u[0] for u in bar.updates] == [1, 2, bar.total] and log["checks"] >= 2
    log, interrupted = fake_comfy(monkeypatch, interrupt_after=2)
    frames = []

    def never(frame, probability):
        frames.append(frame)
        return False

    with pytest.raises(interrupted):
        node.generate_speech("Hello there.", "rt-tiny", "tiny-voice", eos_rule=never, **ARGS)
    assert len(frames) == 3  # the third frame's check raised, and no frame ran after it
    assert [u[0] for u in log["bars"][0].updates] == [1, 2]


@pytest.mark.needs_torch
def test_each_node_refuses_the_other_familys_model(nodes, rt_root):
    with pytest.raises(ValueError, match="rt-tiny is a VibeVoice-Realtime-0.5B model: use it with the VibeVoice "
                                         "Realtime"):
        nodes["VibeVoiceSingleSpeakerNode"].generate_speech("Hi.", "rt-tiny", sampler=forced(1))
    with pytest.raises(ValueError, match="is a VibeVoice 1.5B/7B model"):
        nodes["VibeVoiceRealtimeNode"].generate_speech("Hi.", "microsoft/VibeVoice-1.5B", "tiny-voice", **ARGS)
    with pytest.raises(ValueError, match="is a VibeVoice 1.5B/7B model"):
        nodes["VibeVoiceRealtimeNode"].generate_speech(
            "Hi.", str(rt_root / "models" / "vibevoice" / "VibeVoice-1.5B-mlx"), "tiny-voice", **ARGS)
    (rt_root / "models" / "vibevoice" / "rt-tiny" / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="has no tokenizer files: copy tokenizer.json"):
        nodes["VibeVoiceRealtimeNode"].generate_speech("Hi.", "rt-tiny", "tiny-voice", **ARGS)
    assert MODELS.pipe is None


# --- ComfyUI's model management ---------------------------------------------------------------------------------


def fake_model_management(monkeypatch) -> types.ModuleType:
    """comfy.model_management as ComfyUI 0.3.64 has it, condensed to what loading and unloading do (main.py's
    prompt worker calls unload_all_models() for POST /free {"unload_models": true})."""
    mm = types.ModuleType("comfy.model_management")
    mm.current_loaded_models = []
    mm.get_torch_device = lambda: "cpu"
    mm.emptied = []
    mm.soft_empty_cache = lambda force=False: mm.emptied.append(True)
    mm.throw_exception_if_processing_interrupted = lambda: None

    class LoadedModel:
        def __init__(self, model):
            self._model = weakref.ref(model)
            self.device = model.load_device
            self.real_model = None
            self.model_finalizer = None

        @property
        def model(self):
            return self._model()

        def model_load(self, lowvram_model_memory=0, force_patch_weights=False):
            self.model.model_patches_to(self.device)
            self.model.model_patches_to(self.model.model_dtype())
            self.model.partially_load(self.device, lowvram_model_memory or 1e32, force_patch_weights=False)
            real_model = self.model.model
            self.real_model = weakref.ref(real_model)
            self.model_finalizer = weakref.finalize(real_model, cleanup_models)
            return real_model

        def model_unload(self, memory_to_free=None, unpatch_weights=True):
            if memory_to_free is not None and memory_to_free < self.model.loaded_size():
                if self.model.partially_unload(self.model.offload_device, memory_to_free) >= memory_to_free:
                    return False
            self.model.detach(unpatch_weights)
            self.model_finalizer.detach()
            self.model_finalizer = None
            self.real_model = None
            return True

        def __eq__(self, other):
            return self.model is other.model

        def is_dead(self):
            return self.real_model() is not None and self.model is None

    def cleanup_models():
        for i in [i for i, m in enumerate(mm.current_loaded_models) if m.real_model() is None][::-1]:
            mm.current_loaded_models.pop(i)

    def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                        force_full_load=False):
        for x in set(models) | {p for m in models for p in m.model_patches_models()}:
            loaded = LoadedModel(x)
            if loaded in mm.current_loaded_models:
                continue
            for i in [i for i, m in enumerate(mm.current_loaded_models) if x.is_clone(m.model)][::-1]:
                clone = mm.current_loaded_models.pop(i)
                clone.model.detach(unpatch_all=False)
                clone.model_finalizer.detach()
            loaded.model_load(0)
            mm.current_loaded_models.insert(0, loaded)

    def free_memory(memory_required, device, keep_loaded=()):
        unloaded = []
        for i in range(len(mm.current_loaded_models) - 1, -1, -1):
            m = mm.current_loaded_models[i]
            if m.device == device and m not in keep_loaded and not m.is_dead():
                if m.model_unload(memory_required):
                    unloaded.append(i)
        out = [mm.current_loaded_models.pop(i) for i in sorted(unloaded, reverse=True)]
        if out:
            mm.soft_empty_cache()
        return out

    mm.LoadedModel, mm.cleanup_models, mm.load_models_gpu = LoadedModel, cleanup_models, load_models_gpu
    mm.free_memory = free_memory
    mm.unload_all_models = lambda: free_memory(1e30, mm.get_torch_device())
    comfy = types.ModuleType("comfy")
    comfy.model_management = mm
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    return mm


@pytest.mark.needs_torch
def test_unload_models_releases_the_kept_pipeline(nodes, rt_root, monkeypatch):
    mm = fake_model_management(monkeypatch)
    mx.clear_cache()
    before = mx.get_active_memory()
    node = nodes["VibeVoiceRealtimeNode"]
    node.generate_speech("Hello there.", "rt-tiny", "tiny-voice", eos_rule=stops_after(2), **ARGS)
    assert MODELS.pipe is not None
    (entry,) = mm.current_loaded_models
    size = entry.model.model_size()
    assert size > 100_000 and entry.model.loaded_size() == size  # the tiny model's float32 weights
    assert mx.get_active_memory() >= before + size
    # What main.py's prompt worker does after POST /free {"unload_models": true}:
    mm.unload_all_models()
    assert MODELS.pipe is None and MODELS.key is None and mm.current_loaded_models == [] and mm.emptied
    assert mx.get_active_memory() <= before + size // 10, "MLX still holds the model's weights"
    # The next run loads it again, registered once more; unloading twice is harmless.
    node.generate_speech("Hello there.", "rt-tiny", "tiny-voice", eos_rule=stops_after(1), **ARGS)
    assert MODELS.pipe is not None and len(mm.current_loaded_models) == 1
    mm.unload_all_models()
    mm.unload_all_models()
    assert MODELS.pipe is None and mm.current_loaded_models == []


@pytest.mark.needs_torch
def test_our_own_release_leaves_no_entry_behind(nodes, rt_root, monkeypatch):
    mm = fake_model_management(monkeypatch)
    node = nodes["VibeVoiceRealtimeNode"]
    node.generate_speech("Hi.", "rt-tiny", "tiny-voice", eos_rule=stops_after(1), **ARGS)
    assert len(mm.current_loaded_models) == 1
    node.generate_speech("Hi.", "rt-tiny", "tiny-voice", eos_rule=stops_after(1), **ARGS)
    assert len(mm.current_loaded_models) == 1  # reused, not registered twice
    # free_memory_after_generate and the Free Memory node release it themselves: ComfyUI's finalizer drops the entry.
    node.generate_speech("Hi.", "rt-tiny", "tiny-voice", free_memory_after_generate=True, eos_rule=stops_after(1),
                         **ARGS)
    assert MODELS.pipe is None and mm.current_loaded_models == []
    node.generate_speech("Hi.", "rt-tiny", "tiny-voice", eos_rule=stops_after(1), **ARGS)
    (out,) = nodes["VibeVoiceFreeMemoryNode"].free_vibevoice_memory({"waveform": None, "sample_rate": 24000})
    assert MODELS.pipe is None and mm.current_loaded_models == []


@pytest.mark.needs_torch
def test_unload_models_releases_a_kept_1_5b_pipeline_too(nodes, comfy_tiny, monkeypatch):  # noqa: F811
    mm = fake_model_management(monkeypatch)
    nodes["VibeVoiceSingleSpeakerNode"].generate_speech("Hi.", "vv-tiny", free_memory_after_generate=False,
                                                         sampler=forced(1), **KW)
    assert MODELS.pipe is not None and len(mm.current_loaded_models) == 1
    mm.unload_all_models()
    assert MODELS.pipe is None and mm.current_loaded_models == []
