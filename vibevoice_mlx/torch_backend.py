"""The PyTorch path: transformers' VibeVoice as the reference for parity tests and as a fallback backend.

Device and dtype policy for Apple MPS, CUDA and CPU, loading either checkpoint layout into transformers'
`VibeVoiceForConditionalGeneration` through the one key table in `keys.py`, and a generation call whose
randomness (per-frame diffusion noise) and token choices can be injected, so the MLX port can be compared with it
exactly. torch, transformers and diffusers are imported inside the functions: this module imports without them.

Log lines carry a `[VibeVoice]` prefix; the ones users search for are spelled exactly as other VibeVoice
front-ends print them (e.g. `Failed to move model to MPS, using CPU`).
"""

import json
import logging
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np

from . import memory
from .checkpoint import detect_layout, load_config, normalize_config, to_transformers_config
from .constants import CONTROL_ROLES, QWEN_TOKEN_IDS, SAMPLE_RATE
from .errors import MissingPathError, UserError
from .keys import ORIGINAL, TRANSFORMERS, original_to_transformers, transformers_to_original

logger = logging.getLogger(__name__)
_DEVICE_NAMES = {"mps": "MPS", "cuda": "CUDA", "cpu": "CPU"}
_DTYPE_ALIASES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
                  "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}


class WeightLoadError(UserError):
    """A checkpoint whose tensors do not match the model: names every missing, unexpected or misshaped key."""


def _log(level: int, message: str, *args) -> None:
    logger.log(level, "[VibeVoice] " + message, *args)


def _kind(device: str) -> str:
    return str(device).split(":")[0]


def _probe(value, default: Callable[[], bool]) -> bool:
    if value is None:
        return bool(default())
    return bool(value() if callable(value) else value)


def _torch_mps_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.backends.mps.is_available())


def _torch_cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _torch_bf16_supported() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def resolve_device(device: str = "auto", *, mps_available=None, cuda_available=None, platform: str = None) -> str:
    """The torch device to run on: `auto` picks MPS on macOS when available, else CUDA, else CPU.

    An explicit device ("cpu", "mps", "cuda", "cuda:1") is returned as given. The probes (bools or callables)
    default to torch's own checks; tests inject them.
    """
    device = str(device or "auto").lower()
    if device != "auto":
        if _kind(device) not in _DEVICE_NAMES:
            raise UserError(f"Unknown device {device!r}: choose auto, mps, cuda or cpu.")
        return device
    if (platform or sys.platform) == "darwin" and _probe(mps_available, _torch_mps_available):
        _log(logging.INFO, "MPS (Metal Performance Shaders) detected - macOS M chip GPU acceleration")
        return "mps"
    if _probe(cuda_available, _torch_cuda_available):
        return "cuda"
    return "cpu"


def resolve_dtype(dtype: str = "auto", device: str = "cpu", *, bf16_supported=None) -> str:
    """The compute dtype name: `auto` is float16 on MPS, bfloat16 on CUDA where supported (else float16), float32
    on CPU. bfloat16 is emulated and slow on M1/M2 GPUs, and float32 swaps on 16 GB Macs, hence float16 there."""
    name = str(dtype or "auto").lower()
    if name != "auto":
        if name not in _DTYPE_ALIASES:
            raise UserError(f"Unknown dtype {dtype!r}: choose auto, float32, float16 or bfloat16.")
        return _DTYPE_ALIASES[name]
    kind = _kind(device)
    if kind == "mps":
        return "float16"
    if kind == "cuda":
        return "bfloat16" if _probe(bf16_supported, _torch_bf16_supported) else "float16"
    return "float32"


def _attention(attention: str) -> Optional[str]:
    # Only the language model has attention; the tokenizers reject "sdpa", so it is set on text_config alone.
    attention = str(attention or "auto").lower()
    if attention not in ("auto", "sdpa", "eager"):
        raise UserError(f"Unknown attention {attention!r}: choose auto, sdpa or eager.")
    return None if attention == "auto" else attention


# --- loading -----------------------------------------------------------------------------------------------


def _special_token_ids(normalized: Dict, folders: Sequence[Path]) -> Dict[str, int]:
    """Token ids: the transformers config names them; else the first tokenizer folder's (through the one resolver,
    `processor.SpecialTokens`); else those of the real Qwen2.5 vocabulary."""
    if normalized.get("token_ids"):
        return dict(normalized["token_ids"])
    for folder in folders:
        if (Path(folder) / "tokenizer.json").is_file():
            from transformers import AutoTokenizer

            from .processor import SpecialTokens

            tokens = SpecialTokens.from_tokenizer(AutoTokenizer.from_pretrained(str(folder)))
            return {role: getattr(tokens, role) for role in CONTROL_ROLES}
    return dict(QWEN_TOKEN_IDS)


def _weight_files(folder: Path) -> List[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise MissingPathError(f"No *.safetensors in {folder}: run `vibevoice-mlx convert` on a pickled "
                                "checkpoint first.")
    return files


def _load_original_weights(model, folder: Path, tied: bool) -> None:
    """Copy an original-layout checkpoint into the model tensor by tensor (peak memory: one tensor), strictly."""
    import torch
    from safetensors import safe_open

    targets = model.state_dict()  # shares storage with the parameters
    expected = set(targets) - ({"lm_head.weight"} if tied else set())
    loaded, unexpected, misshaped = set(), [], []
    with torch.no_grad():
        for file in _weight_files(folder):
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    name = original_to_transformers(key)
                    if tied and name == "lm_head.weight":
                        continue  # a tied model always uses the embeddings as its head (architecture.md §4.4)
                    if name not in targets:
                        unexpected.append(key)
                        continue
                    tensor = f.get_tensor(key)
                    if tuple(tensor.shape) != tuple(targets[name].shape):
                        misshaped.append(f"{key}: checkpoint {tuple(tensor.shape)}, model "
                                         f"{tuple(targets[name].shape)}")
                        continue
                    targets[name].copy_(tensor)
                    loaded.add(name)
    missing = sorted(transformers_to_original(k) for k in expected - loaded)  # in the checkpoint's names
    _raise_if_bad(folder, missing, unexpected, misshaped)


def _raise_if_bad(folder, missing, unexpected, misshaped) -> None:
    problems = [f"missing key {k}" for k in missing] + [f"unexpected key {k}" for k in unexpected]
    problems += [f"wrong shape {m}" for m in misshaped]
    if problems:
        shown = "; ".join(problems[:10]) + (f"; ... ({len(problems)} in all)" if len(problems) > 10 else "")
        raise WeightLoadError(f"{folder}: the checkpoint does not match its config: {shown}")


def _build_original(folder: Path, config: Dict, torch_dtype, attn, tokenizer_path, token_ids=None):
    from transformers import VibeVoiceConfig, VibeVoiceForConditionalGeneration

    normalized = normalize_config(config, ORIGINAL)
    kwargs = to_transformers_config(normalized)
    ids = dict(token_ids) if token_ids else _special_token_ids(normalized, [p for p in (tokenizer_path, folder) if p])
    vocab = normalized["decoder_config"]["vocab_size"]
    if max(ids.values()) >= vocab:
        raise WeightLoadError(f"{folder}: special token ids {ids} exceed the vocabulary ({vocab}); pass the "
                              "checkpoint's tokenizer folder as tokenizer_path.")
    kwargs.update(audio_bos_token_id=ids["speech_start"], audio_eos_token_id=ids["speech_end"],
                  audio_token_id=ids["speech_diffusion"], eos_token_id=ids["eos"], pad_token_id=ids["eos"])
    extra = {"attn_implementation": {"text_config": attn}} if attn else {}
    try:  # every weight is overwritten below: skip the (slow, full-size) random init
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older layout of transformers
        from contextlib import nullcontext as no_init_weights
    with no_init_weights():
        model = VibeVoiceForConditionalGeneration._from_config(VibeVoiceConfig(**kwargs), dtype=torch_dtype,
                                                              **extra)
    tied = bool(normalized["tie_word_embeddings"])
    if tied:
        model.tie_weights()
    _load_original_weights(model, folder, tied)
    return model


def _build_transformers(folder: Path, torch_dtype, attn):
    from transformers import VibeVoiceForConditionalGeneration

    extra = {"attn_implementation": {"text_config": attn}} if attn else {}
    model, info = VibeVoiceForConditionalGeneration.from_pretrained(
        str(folder), dtype=torch_dtype, device_map=None, output_loading_info=True, **extra)
    misshaped = [f"{k}: checkpoint {a}, model {b}" for k, a, b in info.get("mismatched_keys", [])]
    _raise_if_bad(folder, sorted(info.get("missing_keys", [])), sorted(info.get("unexpected_keys", [])), misshaped)
    return model


def _own_aligned_memory(model) -> None:
    """Copy tensors that live at unaligned addresses into fresh (aligned) memory.

    from_pretrained maps the safetensors file, so its CPU tensors start at the file's data offsets, and CPU
    kernels round differently on unaligned data (7e-6 in the tiny model's audio). Copying makes a model load
    compute bit-identically whichever layout it came from. Only done for a model that stays on the CPU.
    """
    import torch

    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.data_ptr() % 64:
                t.data = t.data.clone()


def _move_to(model, device, dtype=None):
    """The one place a model changes device (tests replace it to simulate an accelerator)."""
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device=device)


def _device_of(model):
    return next(model.parameters()).device


def _fall_back_to_cpu(model):
    import torch

    _move_to(model, "cpu", torch.float32)  # the CPU dtype policy: float16 matmuls are slow or missing there
    memory.free_memory()


def load_torch_model(path, device: str = "auto", dtype: str = "auto", attention: str = "auto", *,
                     tokenizer_path=None, token_ids: Optional[Dict[str, int]] = None):
    """Load a local VibeVoice folder of either layout into transformers' `VibeVoiceForConditionalGeneration`.

    The original (Microsoft) layout is renamed with `keys.original_to_transformers` and loaded strictly
    (a missing, unexpected or misshaped tensor raises `WeightLoadError` naming it); a tied 1.5B head uses the
    embeddings. Its special-token ids come from `tokenizer.json` in `tokenizer_path` or the folder (else Qwen2.5's).
    The model is loaded on the CPU, then moved to the resolved device; if that fails it stays on the CPU in
    float32 and says so. Returns the model in eval mode.
    """
    import torch

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise MissingPathError(f"{folder} has no config.json: point at a local VibeVoice checkpoint folder.")
    config = load_config(folder)
    layout = detect_layout(config)
    device = resolve_device(device)
    kind = _kind(device)
    dtype_name = resolve_dtype(dtype, device)
    attn = _attention(attention)
    _log(logging.INFO, f"Loading model for {_DEVICE_NAMES[kind]} device with {dtype_name}")
    torch_dtype = getattr(torch, dtype_name)
    if layout == TRANSFORMERS:
        model = _build_transformers(folder, torch_dtype, attn)
    else:
        model = _build_original(folder, config, torch_dtype, attn, tokenizer_path, token_ids)
    model.eval()
    if kind != "cpu":
        try:
            _move_to(model, device)
            _log(logging.INFO, f"Model moved to {_DEVICE_NAMES[kind]} device")
        except Exception as err:  # not built with the backend, out of memory, unsupported dtype, ...
            _log(logging.WARNING, f"Failed to move model to {_DEVICE_NAMES[kind]}, using CPU")
            _log(logging.WARNING, "Move error: %s: %s", type(err).__name__, err)
            _fall_back_to_cpu(model)
            device, kind = "cpu", "cpu"
    if kind == "cpu":
        _own_aligned_memory(model)
    _log(logging.INFO, f"Initialized with device: {device}, type: {kind}")
    return model


# --- generation --------------------------------------------------------------------------------------------


@dataclass
class TorchGeneration:
    """What `torch_generate` returns: float32 mono audio at `sample_rate`, the generated token ids (prompt
    excluded, up to and including eos) and the device the run finished on."""

    audio: np.ndarray
    tokens: np.ndarray
    sample_rate: int = SAMPLE_RATE
    device: str = "cpu"


_DEVICE_ERROR = re.compile(r"\bmps\b|metal|cuda|out of memory", re.IGNORECASE)


def _is_device_error(err: BaseException) -> bool:
    return isinstance(err, (RuntimeError, NotImplementedError)) and bool(_DEVICE_ERROR.search(str(err)))


def _voice_inputs(voices, hop: int, normalize: bool) -> Dict:
    """transformers' `input_values` [S, 1, L_max padded to a multiple of hop] and `padding_mask` [S, L]."""
    from transformers.models.vibevoice_acoustic_tokenizer import VibeVoiceAcousticTokenizerFeatureExtractor

    arrays = [np.asarray(v, dtype=np.float32) for v in voices]
    for i, a in enumerate(arrays):
        if a.ndim != 1 or a.size == 0:
            raise ValueError(f"voice {i}: expected a non-empty mono array, got shape {a.shape}.")
    extractor = VibeVoiceAcousticTokenizerFeatureExtractor(sampling_rate=SAMPLE_RATE, pad_to_multiple_of=hop,
                                                           normalize_audio=normalize)
    features = extractor(arrays, sampling_rate=SAMPLE_RATE)
    return {"input_values": features["input_values"], "padding_mask": features["padding_mask"],
            "frames": [-(-len(a) // hop) for a in arrays]}


def _noise_source(noise, latent: int):
    """Frame index -> initial diffusion noise [latent] (float32), from a callable or a [frames, latent] array."""
    if noise is None or callable(noise):
        return noise
    table = np.asarray(noise, dtype=np.float32)
    if table.ndim != 2 or table.shape[1] != latent:
        raise ValueError(f"noise must be [frames, {latent}], got shape {table.shape}.")

    def from_table(i):
        if i >= len(table):
            raise ValueError(f"noise has {len(table)} frames but generation reached frame {i + 1}: pass more "
                             "rows or lower max_new_tokens.")
        return table[i]

    return from_table


def _token_choice(prompt_len: int, allowed: Sequence[int], vocab: int, forced, sampler):
    """A logits processor that leaves only the forced (or sampled) token of each step; argmax then picks it."""
    import torch
    from transformers import LogitsProcessor

    mask = torch.full((vocab,), float("-inf"))
    mask[list(allowed)] = 0.0

    class TokenChoice(LogitsProcessor):
        def __call__(self, input_ids, scores):
            step = input_ids.shape[1] - prompt_len
            if forced is not None and step < len(forced):
                token = int(forced[step])
            elif sampler is not None:
                masked = scores.float() + mask.to(scores.device)
                token = int(np.asarray(sampler(masked[0].cpu().numpy())).reshape(-1)[0])
            else:
                return scores
            out = torch.full_like(scores, float("-inf"))
            out[:, token] = 0.0
            return out

    return TokenChoice()


@contextmanager
def _patched_randn(shape, value):
    """Make `torch.randn(*shape)` return `value` for the duration (only that shape; others draw as usual)."""
    import torch

    real = torch.randn
    hits = []

    def randn(*size, **kwargs):
        dims = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        if tuple(dims) != tuple(shape):
            return real(*size, **kwargs)
        hits.append(1)
        return value.to(device=kwargs.get("device") or "cpu", dtype=kwargs.get("dtype") or torch.float32)

    torch.randn = randn
    try:
        yield hits
    finally:
        torch.randn = real


@contextmanager
def _per_call_overrides(model, source, latent: int):
    """Instance-level overrides of two generation hooks for one call; the class is never touched.

    * transformers adds `UnbatchedClassifierFreeGuidanceLogitsProcessor` whenever guidance_scale != 1, i.e. it
      also applies CFG to the token logits (one more LM forward per token). The original picks tokens greedily
      from the conditional logits only (architecture.md §6.3), so that processor is dropped.
    * `_sample_audio_latent` draws its initial noise with `torch.randn` inside; with `source` given, the
      frame's noise is injected there (row 0 is the one used; both rows get it).
    """
    from transformers.generation.logits_process import UnbatchedClassifierFreeGuidanceLogitsProcessor

    original_processors = model._get_logits_processor
    original_sample = model._sample_audio_latent
    frame = [0]

    def get_logits_processor(*args, **kwargs):
        processors = original_processors(*args, **kwargs)
        kept = [p for p in processors if not isinstance(p, UnbatchedClassifierFreeGuidanceLogitsProcessor)]
        return type(processors)(kept)

    def sample_audio_latent(positive_condition, negative_condition, *args, **kwargs):
        import torch

        rows = positive_condition.shape[0] + negative_condition.shape[0]
        x = torch.as_tensor(np.asarray(source(frame[0]), dtype=np.float32)).reshape(1, latent)
        frame[0] += 1
        with _patched_randn((rows, latent), x.expand(rows, latent).clone()) as hits:
            out = original_sample(positive_condition, negative_condition, *args, **kwargs)
        if not hits:
            raise RuntimeError("transformers no longer draws the diffusion noise with torch.randn in "
                               "_sample_audio_latent: noise injection needs updating for this version.")
        return out

    model._get_logits_processor = get_logits_processor
    if source is not None:
        model._sample_audio_latent = sample_audio_latent
    try:
        yield
    finally:
        for name in ("_get_logits_processor", "_sample_audio_latent"):
            model.__dict__.pop(name, None)


def _default_scheduler():
    from diffusers import DPMSolverMultistepScheduler

    # What transformers' converted generation_config builds (architecture.md §3.6): DPM-Solver++ 2M, cosine.
    return DPMSolverMultistepScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")


def _generate_once(model, ids, voice, *, steps, cfg_scale, noise, token_sampler, forced_tokens, max_new_tokens,
                   sample, scheduler, seed):
    import torch
    from transformers import LogitsProcessorList

    cfg = model.config
    device = _device_of(model)
    model_dtype = next(model.parameters()).dtype
    latent = cfg.audio_config.hidden_size
    allowed = [cfg.audio_bos_token_id, cfg.audio_eos_token_id, cfg.audio_token_id, cfg.eos_token_id]
    choice = _token_choice(ids.shape[1], allowed, cfg.text_config.vocab_size, forced_tokens, token_sampler)
    kwargs = {}
    if voice:
        kwargs = {"input_values": voice["input_values"].to(device=device, dtype=model_dtype),
                  "padding_mask": voice["padding_mask"].to(device)}
    if seed is not None:
        torch.manual_seed(seed)
    # A scheduler keeps per-run state (step index, solver history): a fresh one per run unless injected.
    scheduler = scheduler if scheduler is not None else _default_scheduler()
    with _per_call_overrides(model, _noise_source(noise, latent), latent):
        out = model.generate(
            input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device), sample=sample,
            noise_scheduler=scheduler, num_diffusion_steps=steps, guidance_scale=cfg_scale,
            max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=cfg.eos_token_id,
            pad_token_id=cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id,
            logits_processor=LogitsProcessorList([choice]), return_dict_in_generate=True, **kwargs)
    tokens = out.sequences[0, ids.shape[1]:].cpu().numpy().astype(np.int64)
    eos = np.flatnonzero(tokens == cfg.eos_token_id)
    tokens = tokens[: eos[0] + 1] if eos.size else tokens
    audio = out.audio[0]
    audio = np.zeros(0, np.float32) if audio is None else audio.float().reshape(-1).cpu().numpy()
    return audio.astype(np.float32), tokens, str(device)


def torch_generate(model, input_ids, voices: Optional[Sequence[np.ndarray]] = None, speech_input_mask=None, *,
                   steps: int = 10, cfg_scale: float = 1.3,
                   noise: Union[None, np.ndarray, Callable[[int], np.ndarray]] = None,
                   token_sampler: Optional[Callable[[np.ndarray], int]] = None,
                   forced_tokens: Optional[Sequence[int]] = None, max_new_tokens: Optional[int] = None,
                   sample_voice_noise: Optional[bool] = None, normalize_voices: bool = False,
                   scheduler=None, seed: Optional[int] = None,
                   free_memory_after_generate: bool = False) -> TorchGeneration:
    """Generate speech with transformers' VibeVoice `generate` (one sequence).

    input_ids: the prompt ([T] or [1, T]) with one speech_diffusion placeholder per voice frame
    (architecture.md §5.4); `speech_input_mask`, if given, must mark exactly those slots. voices: float32 mono
    24 kHz arrays in speaker order, already normalized unless `normalize_voices`; they are zero-padded to a
    multiple of the hop as transformers' feature extractor does. noise: the initial diffusion noise per frame,
    a [frames, latent] array or a callable frame_index -> [latent]; None draws `torch.randn` (seed with `seed`).
    forced_tokens: token ids forced at the first steps (then argmax or `token_sampler`, which receives the float32
    logits [vocab] with -inf outside the four allowed tokens and returns a token id). sample_voice_noise: the
    σ-VAE noise on voice latents; default on unless `noise` is injected, so injected runs are deterministic.
    max_new_tokens defaults to the context left after the prompt. If the run fails with a device error (an op the
    MPS backend lacks, out of memory), the model moves to the CPU (float32) and the run is retried once.
    """
    import torch

    cfg = model.config
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long).reshape(1, -1)
    placeholders = ids[0] == cfg.audio_token_id
    if speech_input_mask is not None:
        mask = torch.as_tensor(np.asarray(speech_input_mask), dtype=torch.bool).reshape(-1)
        if mask.shape != placeholders.shape or not torch.equal(mask, placeholders):
            raise ValueError("speech_input_mask must be True exactly on the speech_diffusion placeholder tokens "
                             "(transformers places voice embeddings by token id).")
    voice = _voice_inputs(voices, cfg.audio_config.hop_length, normalize_voices) if voices else None
    wanted = sum(voice["frames"]) if voice else 0
    if int(placeholders.sum()) != wanted:
        raise ValueError(f"the prompt has {int(placeholders.sum())} voice placeholder tokens but the voices give "
                         f"{wanted} frames (ceil(samples / {cfg.audio_config.hop_length}) each).")
    if forced_tokens is not None:
        allowed = {cfg.audio_bos_token_id, cfg.audio_eos_token_id, cfg.audio_token_id, cfg.eos_token_id}
        bad = [int(t) for t in forced_tokens if int(t) not in allowed]
        if bad:
            raise ValueError(f"forced tokens {bad} are not among the allowed ids {sorted(allowed)}.")
    if max_new_tokens is None:
        max_new_tokens = max(1, cfg.text_config.max_position_embeddings - ids.shape[1])
    sample = (noise is None) if sample_voice_noise is None else bool(sample_voice_noise)
    run = dict(steps=steps, cfg_scale=cfg_scale, noise=noise, token_sampler=token_sampler,
               forced_tokens=forced_tokens, max_new_tokens=max_new_tokens, sample=sample, scheduler=scheduler,
               seed=seed)
    try:
        audio, tokens, device = _generate_once(model, ids, voice, **run)
    except (RuntimeError, NotImplementedError) as err:
        kind = _device_of(model).type
        if kind == "cpu" or not _is_device_error(err):
            raise
        _log(logging.WARNING, "Generation failed on %s (%s: %s), retrying on CPU", _DEVICE_NAMES.get(kind, kind),
             type(err).__name__, err)
        _fall_back_to_cpu(model)
        _log(logging.INFO, "Initialized with device: cpu, type: cpu")
        audio, tokens, device = _generate_once(model, ids, voice, **run)
    if free_memory_after_generate:
        memory.free_memory()
    return TorchGeneration(audio=audio, tokens=tokens, sample_rate=SAMPLE_RATE, device=device)

