"""The ComfyUI nodes (V1 style), with the node ids, inputs and order of the VibeVoice ComfyUI packs.

Workflows made with those packs load with these nodes. `attention_type` means something only on the PyTorch path;
`quantize_llm` picks a converted 4/8-bit model on MLX (see models.py). The generating methods also take keyword-only
`backend`, `sampler` and `max_seconds`, which ComfyUI never passes: they are for Python callers and tests. In ComfyUI
the PyTorch path is asked for with VIBEVOICE_MLX_COMFYUI_BACKEND=torch; it is no input, so that the packs' saved
workflows (whose widget values are positional) still fit.
"""

import hashlib
import logging
import os
import re
from pathlib import Path

from ..models import REALTIME, VIBEVOICE
from .models import ATTENTION_TYPES, MODELS, NO_REALTIME_MODEL, QUANTIZE_BITS, available_models, default_backend, \
    voices_dir
from .runtime import audio_from_samples, synthesize, voice_from_audio

logger = logging.getLogger(__name__)

CATEGORY = "VibeVoice"
MAX_SPEAKERS = 4
TEXT_DIRS = ("input", "output", "temp")
NO_TEXT_FILES = "No text files found in any directory"


def _model_input(tooltip: str = "A converted model from models/vibevoice/ or the cache, or a hub id (converted "
                                "once).", kind: str = VIBEVOICE):
    choices = list(available_models(kind)) or [NO_REALTIME_MODEL]  # the 1.5B list always has the hub id
    return (choices, {"default": choices[0], "tooltip": tooltip})


def _speak(load, text: str, voices, free_memory_after_generate: bool, **options):
    """Load (or reuse) the pipeline, speak `text` and return the AUDIO output; release the pipeline after if asked,
    or on failure (an interrupted run included)."""
    if not text or not text.strip():
        raise ValueError("No text to speak: type it into the node or connect a Load Text From File node.")
    pipe = load()
    rate = pipe.sample_rate
    try:
        audio = synthesize(pipe, text, voices, **options)
    finally:
        del pipe  # so that releasing the cache frees the weights
        if free_memory_after_generate:
            MODELS.release()
    return (audio_from_samples(audio, rate),)


def _speech_inputs(text_default: str, voice_inputs: dict) -> dict:
    return {
        "required": {
            "text": ("STRING", {"multiline": True, "default": text_default, "dynamicPrompts": True,
                                "tooltip": "What to say; pause tags like [pause] or [pause:500ms] insert silence."}),
            "model": _model_input(),
            "attention_type": (list(ATTENTION_TYPES), {
                "default": "auto",
                "tooltip": "PyTorch path only (flash_attention_2 and sage run as auto); MLX always uses its fused "
                           "attention."}),
            "quantize_llm": (list(QUANTIZE_BITS), {
                "default": "full precision",
                "tooltip": "MLX: use a converted 4/8-bit language model (<model>-4bit beside the model, else "
                           "converted once into the cache). Pays off on Apple GPUs; slow on MLX's CPU backend."}),
            "free_memory_after_generate": ("BOOLEAN", {
                "default": True, "tooltip": "Release the model after this run; off keeps it loaded for the next."}),
            "diffusion_steps": ("INT", {"default": 10, "min": 1, "max": 100, "step": 1,
                                        "tooltip": "Diffusion steps per frame (10 as the original demos)."}),
            "seed": ("INT", {"default": 42, "min": 0, "max": 2**32 - 1, "tooltip": "Same seed, same speech."}),
            "cfg_scale": ("FLOAT", {"default": 1.3, "min": 0.5, "max": 3.5, "step": 0.05,
                                    "tooltip": "Classifier-free guidance scale (official default 1.3)."}),
            "use_sampling": ("BOOLEAN", {"default": False,
                                         "tooltip": "Off: greedy, as the original. On: temperature and top_p."}),
        },
        "optional": {
            **voice_inputs,
            "temperature": ("FLOAT", {"default": 0.95, "min": 0.1, "max": 2.0, "step": 0.05,
                                      "tooltip": "Only used when use_sampling is on."}),
            "top_p": ("FLOAT", {"default": 0.95, "min": 0.1, "max": 1.0, "step": 0.05,
                                "tooltip": "Only used when use_sampling is on."}),
        },
    }


class _SpeechNode:
    RETURN_TYPES = ("AUDIO",)
    RETURN_NAMES = ("audio",)
    FUNCTION = "generate_speech"
    CATEGORY = CATEGORY

    def _speak(self, text, model, voices, attention_type, quantize_llm, free_memory_after_generate,
               diffusion_steps, seed, cfg_scale, use_sampling, temperature, top_p, backend, sampler, max_seconds):
        backend = backend or default_backend()
        return _speak(lambda: MODELS.get(model, quantize_llm, backend, attention_type), text, voices,
                      free_memory_after_generate, steps=diffusion_steps, cfg_scale=cfg_scale, seed=seed,
                      temperature=temperature if use_sampling else 0.0, top_p=top_p if use_sampling else 1.0,
                      sampler=sampler, max_seconds=max_seconds)


class VibeVoiceSingleSpeakerNode(_SpeechNode):
    DESCRIPTION = "Speech from text with one voice (VibeVoice on MLX), optionally cloned from a sample."

    @classmethod
    def INPUT_TYPES(cls):
        voice = {"voice_to_clone": ("AUDIO", {"tooltip": "Optional voice sample, any rate, mono or stereo; without "
                                                         "one the model picks a voice."})}
        return _speech_inputs("Hello, this is a test of the VibeVoice text-to-speech system.", voice)

    def generate_speech(self, text, model, attention_type="auto", quantize_llm="full precision",
                        free_memory_after_generate=True, diffusion_steps=10, seed=42, cfg_scale=1.3,
                        use_sampling=False, voice_to_clone=None, temperature=0.95, top_p=0.95, *, backend=None,
                        sampler=None, max_seconds=None):
        voices = [] if voice_to_clone is None else [voice_from_audio(voice_to_clone, "voice_to_clone")]
        return self._speak(text, model, voices, attention_type, quantize_llm, free_memory_after_generate,
                           diffusion_steps, seed, cfg_scale, use_sampling, temperature, top_p, backend, sampler,
                           max_seconds)


class VibeVoiceMultipleSpeakersNode(_SpeechNode):
    DESCRIPTION = "A conversation of up to 4 speakers ([1]: ... lines), each with an optional voice sample."

    @classmethod
    def INPUT_TYPES(cls):
        voices = {f"speaker{i}_voice": ("AUDIO", {"tooltip": f"Optional voice sample for [{i}]:."})
                  for i in range(1, MAX_SPEAKERS + 1)}
        return _speech_inputs("[1]: Hello, this is the first speaker.\n[2]: Hi, I'm the second speaker.", voices)

    def generate_speech(self, text, model, attention_type="auto", quantize_llm="full precision",
                        free_memory_after_generate=True, diffusion_steps=10, seed=42, cfg_scale=1.3,
                        use_sampling=False, speaker1_voice=None, speaker2_voice=None, speaker3_voice=None,
                        speaker4_voice=None, temperature=0.95, top_p=0.95, *, backend=None, sampler=None,
                        max_seconds=None):
        slots = [speaker1_voice, speaker2_voice, speaker3_voice, speaker4_voice]
        last = max((i for i, v in enumerate(slots) if v is not None), default=-1)
        gaps = [f"speaker{i + 1}_voice" for i in range(last) if slots[i] is None]
        if gaps:
            # Voices go to speakers by position, so a gap would shift every later voice onto the wrong speaker.
            raise ValueError(f"{', '.join(gaps)} not connected: voices go to speakers in order, so connect one for "
                             f"every speaker up to speaker{last + 1}_voice, or none.")
        voices = [voice_from_audio(v, f"speaker{i + 1}_voice") for i, v in enumerate(slots[:last + 1])]
        return self._speak(text, model, voices, attention_type, quantize_llm, free_memory_after_generate,
                           diffusion_steps, seed, cfg_scale, use_sampling, temperature, top_p, backend, sampler,
                           max_seconds)


class VibeVoiceRealtimeNode:
    DESCRIPTION = ("Speech from text with VibeVoice-Realtime-0.5B (MLX) in one of its voice presets; the model has "
                   "no voice cloning.")
    RETURN_TYPES = ("AUDIO",)
    RETURN_NAMES = ("audio",)
    FUNCTION = "generate_speech"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        from ..preset_store import DEFAULT_PRESET, list_presets, preset_dir

        return {"required": {
            "text": ("STRING", {"multiline": True, "default": "Hello, this is VibeVoice Realtime on MLX.",
                                "tooltip": "What to say."}),
            "model": _model_input("A VibeVoice-Realtime-0.5B folder from models/vibevoice/ (with its tokenizer "
                                  "files).", REALTIME),
            "voice": ([row["name"] for row in list_presets()], {
                "default": DEFAULT_PRESET,
                "tooltip": f"A voice preset: downloaded once from microsoft/VibeVoice, or a .pt put into "
                           f"{preset_dir()}."}),
            "cfg_scale": ("FLOAT", {"default": 1.5, "min": 0.5, "max": 3.5, "step": 0.05,
                                    "tooltip": "Classifier-free guidance scale (the demos' 1.5)."}),
            "diffusion_steps": ("INT", {"default": 5, "min": 1, "max": 100, "step": 1,
                                        "tooltip": "Diffusion steps per frame (the demos' 5)."}),
            "seed": ("INT", {"default": 42, "min": 0, "max": 2**32 - 1, "tooltip": "Same seed, same speech."}),
            "free_memory_after_generate": ("BOOLEAN", {
                "default": False, "tooltip": "Release the model after this run; off keeps it loaded for the next "
                                             "(ComfyUI's Unload Models releases it too)."}),
        }}

    def generate_speech(self, text, model, voice=None, cfg_scale=1.5, diffusion_steps=5, seed=42,
                        free_memory_after_generate=False, *, eos_rule=None, max_seconds=None):
        # No voice: the model's default preset (en-Carter_man, the web demo's).
        return _speak(lambda: MODELS.get_realtime(model), text, [voice] if voice else [], free_memory_after_generate,
                      steps=diffusion_steps, cfg_scale=cfg_scale, seed=seed, eos_rule=eos_rule,
                      max_seconds=max_seconds)


class VibeVoiceFreeMemoryNode:
    DESCRIPTION = "Release the loaded VibeVoice model when audio passes through."
    RETURN_TYPES = ("AUDIO",)
    RETURN_NAMES = ("audio",)
    FUNCTION = "free_vibevoice_memory"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"audio": ("AUDIO", {"tooltip": "Passed through unchanged; its arrival frees memory."})}}

    def free_vibevoice_memory(self, audio):
        MODELS.release()
        return (audio,)


class VibeVoiceSaveVoiceNode:
    DESCRIPTION = "Encode a voice sample once into a saved voice (.safetensors), reusable without re-encoding."
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("voice_path",)
    FUNCTION = "save_voice"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "audio": ("AUDIO", {"tooltip": "The voice sample: any rate, mono or stereo."}),
            "model": _model_input("The model whose acoustic tokenizer encodes the voice."),
            "name": ("STRING", {"default": "my_voice", "tooltip": f"File name in {voices_dir()}."}),
            "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace a saved voice of the same name."}),
        }}

    def save_voice(self, audio, model, name="my_voice", overwrite=False):
        import vibevoice_mlx as vv

        stem = name[: -len(".safetensors")] if name.endswith(".safetensors") else name
        if not re.fullmatch(r"[\w][\w .\-]*", stem):
            raise ValueError(f"Voice name {name!r}: use letters, digits, spaces, '.', '-' and '_' only.")
        folder = voices_dir()
        path = folder / f"{stem}.safetensors"
        if path.exists() and not overwrite:
            raise FileExistsError(f"A saved voice {path} exists: turn on overwrite or choose another name.")
        voice = voice_from_audio(audio, "audio")
        folder.mkdir(parents=True, exist_ok=True)
        vv.save_voice(MODELS.get(model), voice, path, force=overwrite)
        logger.info("Saved voice %s", path)
        return (str(path),)


def _text_dir(kind: str):
    import folder_paths

    return {"input": folder_paths.get_input_directory, "output": folder_paths.get_output_directory,
            "temp": folder_paths.get_temp_directory}[kind]()


def _text_path(file: str) -> Path:
    """`input/name.txt` (ComfyUI's input, output or temp folder) or, outside ComfyUI, a plain path."""
    kind, _, rest = file.partition("/")
    if kind in TEXT_DIRS and rest:
        try:
            return Path(_text_dir(kind)) / rest
        except ImportError:
            pass
    return Path(file).expanduser()


class LoadTextFromFileNode:
    DESCRIPTION = "Load a script from a .txt file in ComfyUI's input, output or temp folder."
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("text",)
    FUNCTION = "load_text"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        files = []
        for kind in TEXT_DIRS:
            try:
                folder = _text_dir(kind)
                names = os.listdir(folder)
            except (ImportError, OSError):
                continue
            files += [f"{kind}/{n}" for n in names if n.lower().endswith(".txt")
                      and os.path.isfile(os.path.join(folder, n))]
        return {"required": {"file": (sorted(files) or [NO_TEXT_FILES],
                                      {"tooltip": "A .txt file, as folder/name."})}}

    @classmethod
    def IS_CHANGED(cls, file):
        # ComfyUI re-runs the node when this changes: the file's content, not its name.
        try:
            return hashlib.sha256(_text_path(file).read_bytes()).hexdigest()
        except OSError:
            return file

    def load_text(self, file):
        path = _text_path(file)
        if file == NO_TEXT_FILES or not path.is_file():
            raise FileNotFoundError(f"Text file {file!r} not found: put a .txt file into ComfyUI's input folder "
                                    "and choose it.")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text ({e}): save it as UTF-8.") from None
        if not text.strip():
            raise ValueError(f"{path} is empty.")
        return (text,)


NODE_CLASS_MAPPINGS = {
    "VibeVoiceSingleSpeakerNode": VibeVoiceSingleSpeakerNode,
    "VibeVoiceMultipleSpeakersNode": VibeVoiceMultipleSpeakersNode,
    "VibeVoiceFreeMemoryNode": VibeVoiceFreeMemoryNode,
    "VibeVoiceSaveVoiceNode": VibeVoiceSaveVoiceNode,
    "LoadTextFromFileNode": LoadTextFromFileNode,
    "VibeVoiceRealtimeNode": VibeVoiceRealtimeNode,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "VibeVoiceSingleSpeakerNode": "VibeVoice Single Speaker",
    "VibeVoiceMultipleSpeakersNode": "VibeVoice Multiple Speakers",
    "VibeVoiceFreeMemoryNode": "VibeVoice Free Memory",
    "VibeVoiceSaveVoiceNode": "VibeVoice Save Voice",
    "LoadTextFromFileNode": "Load Text From File",
    "VibeVoiceRealtimeNode": "VibeVoice Realtime (MLX)",
}
