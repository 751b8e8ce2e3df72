"""`vibevoice-mlx convert`: a PyTorch VibeVoice checkpoint (1.5B/7B in either layout, or Realtime-0.5B) to a
self-contained MLX folder.

This is the loader (read, rename with the one key table, the family's `sanitize`, strict check) plus cast, quantize
and save. `models.family` picks the model class and config; the realtime release needs no renaming (its names are
the model's) and has no control tokens to record. Tensors stream through one at a time, so converting needs
about one output shard of memory, not the model.
The folder is built beside the target and renamed into place at the end: it appears complete or not at all.
"""

import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .. import __version__
from .. import hub
from ..checkpoint import REALTIME, check_weights, detect_layout, load_config, normalize_config, read_weights
from ..constants import COMFYUI_MODEL_FOLDER, DEFAULT_CFG_SCALE, DEFAULT_STEPS, DTYPE_NAMES, GENERATION_CONFIG, mlx_dtype
from ..errors import UserError, exists_message
from ..keys import to_original
from ..models import REALTIME as REALTIME_FAMILY, family, realtime
from ..models.vibevoice import Model, ModelConfig
from ..output import DiskFullError, writing
from ..preset_store import DEFAULT_PRESET, PRESET_NAMES
from ..realtime_api import DEFAULT_CFG_SCALE as RT_CFG_SCALE, DEFAULT_STEPS as RT_STEPS
from .dtypes import RangeStats, cast

logger = logging.getLogger(__name__)

CONVERTER = f"vibevoice-mlx {__version__}"
MAX_SHARD_BYTES = 1 << 30  # bounds the conversion's memory: one shard is held before it is written
GENERATION_DEFAULTS = {"steps": DEFAULT_STEPS, "cfg_scale": DEFAULT_CFG_SCALE}  # what `load` reads back
REALTIME_DEFAULTS = {"steps": RT_STEPS, "cfg_scale": RT_CFG_SCALE}  # the demos' settings (realtime.md §4.10)
PREPROCESSOR_CONFIG = "preprocessor_config.json"
Q_BITS = (2, 3, 4, 5, 6, 8)
Q_GROUP_SIZES = (32, 64, 128)
class ConversionError(UserError):
    """A checkpoint or argument that cannot be converted; the message names the problem and the fix."""


def convert(
    model: str,
    mlx_path: str,
    dtype: str = "float16",
    quantize: bool = False,
    q_bits: Optional[int] = None,
    q_group_size: Optional[int] = None,
    tokenizer: Optional[str] = None,
    force: bool = False,
    upload_repo: Optional[str] = None,
    allow_pickle: bool = False,
    revision: Optional[str] = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Convert `model` (local folder or hub repo id, original or transformers layout) to an MLX folder.

    `dtype` is the storage dtype of the weights (tensors that must stay float32 do); `quantize` quantizes the
    language model's Linear layers to `q_bits` (default 4) with groups of `q_group_size` (default 64); either
    without `quantize` is refused, as it would quantize nothing. Tokenizer files come from the
    source, from `tokenizer` (folder or repo id), or from the Qwen repo the source's preprocessor config names.
    Returns the folder.
    """
    start = time.perf_counter()
    if dtype not in DTYPE_NAMES:
        raise ConversionError(f"dtype {dtype!r} is not one of {', '.join(DTYPE_NAMES)}.")
    if not quantize and (q_bits is not None or q_group_size is not None):
        raise ConversionError("--q-bits and --q-group-size take effect with -q (--quantize): add -q to quantize "
                              "the language model, or leave them out.")
    q_bits, q_group_size = q_bits or 4, q_group_size or 64
    if quantize and (q_bits not in Q_BITS or q_group_size not in Q_GROUP_SIZES):
        raise ConversionError(f"Quantization needs bits in {Q_BITS} and a group size in {Q_GROUP_SIZES}.")
    target = Path(mlx_path).expanduser().absolute()
    _check_target(target, None, force)  # before a download, not after
    source = hub.resolve(model, revision, hub.MODEL_PATTERNS + (hub.PICKLE_PATTERNS if allow_pickle else []))
    _check_target(target, source, force)

    raw_config = load_config(source)
    layout = detect_layout(raw_config)  # refuses a model_type of no known family in one line
    is_realtime = family(raw_config) == REALTIME_FAMILY
    tok_folder = _tokenizer_folder(source, tokenizer)  # before the slow part: a missing tokenizer fails fast
    config, mlx_model = _family_model(raw_config, layout, tok_folder)  # lazy parameters: shapes only

    if is_realtime:
        _check_realtime_source(model, source)
        stored = read_checkpoint(source)
        _refuse_encoder(model, stored)
        dropped = sorted(set(stored) & set(realtime.UNUSED_KEYS))  # in the release, never read: left out on purpose
    else:
        stored, dropped = _rename(read_checkpoint(source, allow_pickle), layout), []
    weights = mlx_model.sanitize(stored, layout)
    del stored
    try:
        check_weights(mlx_model, weights)
    except ValueError as e:
        raise ConversionError(f"{model}: {e}") from None
    quantized = _quantize_model(mlx_model, q_bits, q_group_size) if quantize else set()
    expected = dict(tree_flatten(mlx_model.parameters()))
    plan = _plan(mlx_model, weights, expected, quantized, mlx_dtype(dtype), max_shard_bytes)
    n_params = sum(math.prod(v.shape) for v in weights.values())

    target.parent.mkdir(exist_ok=True)  # only ComfyUI's models/vibevoice/ may be missing (see _check_target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.converting-", dir=target.parent))
    try:
        with writing(target):  # a full disk: one line, not libsndfile's or MLX's traceback
            _chmod_like_mkdir(tmp)
            stats, n_bytes = _write_weights(tmp, weights, plan, quantized, q_bits, q_group_size)
            del weights
            out_config = dict(config)
            if quantize:
                out_config["quantization"] = {"group_size": q_group_size, "bits": q_bits}
            out_config["conversion"] = {
                "source": recorded_source(model),
                "revision": hub.snapshot_commit(source) or revision,
                "source_layout": layout,
                "dtype": dtype,
                "converter": CONVERTER,
                "float16_subnormal_values": stats.subnormal,
                "float16_flushed_values": stats.flushed,
            }
            if dropped:
                out_config["conversion"]["dropped_tensors"] = {
                    k: "never read (the TTS language model is always fed input embeddings)" for k in dropped}
            _write_json(tmp / "config.json", out_config)
            _write_json(tmp / GENERATION_CONFIG, REALTIME_DEFAULTS if is_realtime else GENERATION_DEFAULTS)
            for f in _tokenizer_files(tok_folder):
                shutil.copyfile(f, tmp / f.name)
            if is_realtime and (source / PREPROCESSOR_CONFIG).is_file():
                shutil.copyfile(source / PREPROCESSOR_CONFIG, tmp / PREPROCESSOR_CONFIG)
            (tmp / "README.md").write_text(_model_card(out_config, upload_repo or str(target)))
            _move_into_place(tmp, target)
    except DiskFullError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DiskFullError(f"{e}; nothing was written.") from None
    except BaseException:
        # Errors and Ctrl-C alike: nothing half-written is left behind.
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    if stats.subnormal:
        logger.info(stats.summary())
    q = f", {q_bits}-bit LM{'s' if is_realtime else ''} (group {q_group_size})" if quantize else ""
    logger.info("Converted %s parameters (%.2f GB, %s%s) in %.2f s to %s", f"{n_params:,}", n_bytes / 1e9, dtype, q,
                time.perf_counter() - start, target)
    if upload_repo:
        upload(target, upload_repo)
    return target


# --- reading -------------------------------------------------------------------------------------------------


def read_checkpoint(folder: Path, allow_pickle: bool = False) -> Dict[str, mx.array]:
    """Every tensor of a PyTorch checkpoint folder under its stored name, as lazy arrays (read on evaluation).

    safetensors (single or sharded with an index) are preferred; pickles (`.bin`, `.pt`) are read only with
    `allow_pickle`, and then through torch's weights-only loader, which cannot run code.
    """
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        missing = sorted({f for f in weight_map.values() if not (folder / f).exists()})
        if missing:
            raise ConversionError(f"{folder}: {', '.join(missing)} listed in {index.name} is missing: "
                                  "the download is incomplete.")
    if list(folder.glob("*.safetensors")):
        try:
            weights, fmt = read_weights(folder)
        except ValueError as e:
            raise ConversionError(str(e)) from None
        if fmt == "mlx":
            raise ConversionError(f"{folder} is an MLX folder already: load it directly (`say --model {folder}`).")
        if index.exists():
            absent = sorted(set(weight_map) - set(weights))
            if absent:
                raise ConversionError(f"{folder}: {len(absent)} tensor(s) in {index.name} are in no file "
                                      f"({', '.join(absent[:3])}): the download is incomplete.")
        return weights
    pickles = sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt"))
    if not pickles:
        raise ConversionError(f"No *.safetensors (or pickled *.bin / *.pt) weights in {folder}.")
    if not allow_pickle:
        raise ConversionError(
            f"{folder} holds pickled PyTorch weights ({pickles[0].name}), which can run code when loaded: "
            "pass --allow-pickle to read them with torch's weights-only loader."
        )
    return _read_pickles(pickles)


def _read_pickles(files: List[Path]) -> Dict[str, mx.array]:
    try:
        import torch
    except ImportError:
        raise ConversionError("Reading pickled checkpoints needs torch: pip install 'vibevoice-mlx[torch]'.") from None
    out = {}
    for f in files:
        try:
            state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # weights-only unpickling refuses anything but tensors and containers
            raise ConversionError(f"Cannot read {f} with torch's weights-only loader: {str(e).splitlines()[0]}") \
                from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ConversionError(f"{f} holds a {type(state).__name__}, not a state dict of tensors.")
        for k, t in state.items():
            if not isinstance(t, torch.Tensor):
                raise ConversionError(f"{f}: entry {k!r} is a {type(t).__name__}, not a tensor.")
            # numpy has no bfloat16: move the bits as int16 and reinterpret them in MLX.
            if t.dtype == torch.bfloat16:
                out[k] = mx.array(t.contiguous().view(torch.int16).numpy()).view(mx.bfloat16)
            else:
                out[k] = mx.array(t.contiguous().numpy())
    return out


def _family_model(raw_config: Dict, layout: str, tok_folder: Path) -> Tuple[Dict, nn.Module]:
    """The config to write and the (lazy) model of the checkpoint's family: the 1.5B/7B config is normalized and
    given the tokenizer's control-token ids; the realtime one is kept as it is (its model reads the original
    fields) and needs only a tokenizer that loads."""
    if family(raw_config) == REALTIME_FAMILY:
        config = {k: v for k, v in raw_config.items() if k not in ("quantization", "conversion")}
        _open_tokenizer(tok_folder)
        return config, realtime.RealtimeModel(realtime.RealtimeConfig.from_dict(config))
    config = normalize_config(raw_config, layout)
    _fill_token_ids(config, tok_folder)
    return config, Model(ModelConfig.from_normalized(config))


def _check_realtime_source(model: str, source: Path) -> None:
    """The realtime release is one model.safetensors: .pt files beside it are voice presets, never weights."""
    if not list(source.glob("*.safetensors")):
        raise ConversionError(
            f"{model}: no *.safetensors weights in {source}. VibeVoice-Realtime-0.5B is released as "
            "model.safetensors (its .pt files are voice presets for `vibevoice-mlx voices`, not weights): "
            "download the model's model.safetensors.")


def _refuse_encoder(model: str, weights: Dict[str, mx.array]) -> None:
    """An acoustic encoder means some other checkpoint: the realtime release has none (voices are presets)."""
    encoder = next((k for k in sorted(weights) if k.startswith("model.acoustic_tokenizer.encoder.")), None)
    if encoder:
        raise ConversionError(f"{model}: {encoder} is an acoustic encoder tensor; VibeVoice-Realtime-0.5B has no "
                              "encoder (voices are presets), so this is not the realtime release: convert the "
                              "released model.safetensors.")


def _rename(weights: Dict[str, mx.array], layout: str) -> Dict[str, mx.array]:
    renamed = to_original(weights, layout)
    if len(renamed) != len(weights):
        raise ConversionError("Two tensors of the checkpoint map to the same name: it mixes both layouts.")
    return renamed


# --- the plan: names, dtypes and shards decided before any data is read ----------------------------------------


def _quantize_model(model: nn.Module, bits: int, group_size: int) -> set:
    """Swap the model's quantizable Linear layers for quantized ones; returns their paths."""

    def predicate(path, module):
        if not model.quant_predicate(path, module):
            return False
        if module.weight.shape[-1] % group_size:
            raise ConversionError(f"{path} has input size {module.weight.shape[-1]}, not a multiple of "
                                  f"--q-group-size {group_size}: choose a group size that divides it.")
        return True

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=predicate)
    return {p for p, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)}


def _outputs(key: str, quantized: set) -> List[str]:
    path, leaf = key.rsplit(".", 1)
    if leaf == "weight" and path in quantized:
        return [key, f"{path}.scales", f"{path}.biases"]
    return [key]


def _plan(model, weights, expected, quantized, dtype, max_shard_bytes) -> List[List[Tuple[str, mx.Dtype]]]:
    """Shards of (key, storage dtype), in sorted key order so both layouts give byte-identical files."""
    shards, size = [[]], 0
    for key in sorted(weights):
        store = dtype if model.cast_predicate(key) else mx.float32  # the one dtype policy, as at load
        outs = _outputs(key, quantized)
        if len(outs) == 1:
            nbytes = weights[key].size * store.size
        else:  # packed uint32 weight (shape from the quantized model), scales and biases in `store`
            packed, scales, biases = (expected[name] for name in outs)
            nbytes = packed.size * 4 + (scales.size + biases.size) * store.size
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((key, store))
        size += nbytes
    return shards


# --- writing -------------------------------------------------------------------------------------------------


def _write_weights(folder: Path, weights, plan, quantized, bits, group_size) -> Tuple[RangeStats, int]:
    """Stream the tensors through cast and quantize into the planned shards; writes the index too."""
    from tqdm import tqdm

    stats, total, weight_map = RangeStats(), 0, {}
    names = ["model.safetensors"] if len(plan) == 1 else \
        [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    with tqdm(total=len(weights), unit="tensor", desc="Converting", disable=None, leave=False) as bar:
        for name, shard in zip(names, plan):
            tensors = {}
            for key, store in shard:
                # pop: once written, nothing may keep the source tensor (or its file data) alive.
                x = cast(key, weights.pop(key), store, stats)
                path = key.rsplit(".", 1)[0]
                if key.endswith(".weight") and path in quantized:
                    wq, scales, biases = mx.quantize(x, group_size=group_size, bits=bits)
                    out = {key: wq, f"{path}.scales": scales, f"{path}.biases": biases}
                else:
                    out = {key: x}
                mx.eval(out)
                tensors.update(out)
                bar.update(1)
            mx.save_safetensors(str(folder / name), tensors, metadata={"format": "mlx"})
            total += sum(v.nbytes for v in tensors.values())
            weight_map.update({k: name for k in tensors})
            del tensors, out, x
            mx.clear_cache()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(folder / "model.safetensors.index.json", index)
    return stats, total


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _check_target(target: Path, source: Optional[Path], force: bool) -> None:
    if target.exists():
        if not force:
            raise ConversionError(exists_message(target, "--mlx-path"))
        src = source.resolve() if source is not None else None
        if src is not None and (src == target.resolve() or target.resolve() in src.parents):
            raise ConversionError(f"--mlx-path {target} holds the source checkpoint: --force would delete it.")
    if not target.parent.is_dir() and not is_comfyui_model_folder(target.parent):
        raise ConversionError(f"The folder {target.parent} (parent of --mlx-path) does not exist.")
    folder = target.parent if target.parent.is_dir() else target.parent.parent  # where the new folder goes
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConversionError(f"Cannot write --mlx-path {target}: the folder {folder} is not writable.")


def is_comfyui_model_folder(folder: Path) -> bool:
    """`<ComfyUI>/models/vibevoice`, which a fresh ComfyUI lacks until a VibeVoice pack creates it: convert may."""
    models = folder.parent
    return folder.name == COMFYUI_MODEL_FOLDER and models.name == "models" and models.is_dir() and \
        (models.parent / "custom_nodes").is_dir()


def recorded_source(model: str) -> str:
    """What the config records as the source: a local folder as an absolute path (a relative one would mean
    nothing to a later reader, such as the ComfyUI nodes' 8-bit option), a hub id as it is."""
    path = Path(model).expanduser()
    return os.path.abspath(path) if path.exists() else str(model)


def _chmod_like_mkdir(folder: Path) -> None:
    """mkdtemp makes the folder private (0700); the finished folder gets the permissions mkdir would give."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished folder to `target`; an existing one (--force) is moved aside first, then deleted."""
    old = None
    if target.exists() or target.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
    try:
        os.replace(tmp, target)
    except BaseException:
        if old is not None:
            os.replace(old / target.name, target)
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --- tokenizer -----------------------------------------------------------------------------------------------


def _tokenizer_files(folder: Path) -> List[Path]:
    return [folder / n for n in hub.TOKENIZER_PATTERNS if (folder / n).is_file()]


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or \
        ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())


def _tokenizer_folder(source: Path, tokenizer: Optional[str]) -> Path:
    """Where the tokenizer files come from: --tokenizer, else the source, else the Qwen repo it names."""
    hint = "pass --tokenizer <folder or hub repo id> with the Qwen2.5 tokenizer files (tokenizer.json)"
    if tokenizer:
        try:
            folder = hub.resolve(tokenizer, allow_patterns=hub.TOKENIZER_PATTERNS)
        except hub.HubError as e:
            raise ConversionError(f"--tokenizer: {e}") from None
        if not _has_tokenizer(folder):
            raise ConversionError(f"--tokenizer {tokenizer} has no tokenizer.json (or vocab.json + merges.txt).")
        return folder
    if _has_tokenizer(source):
        return source
    pre = source / "preprocessor_config.json"
    name = json.loads(pre.read_text()).get("language_model_pretrained_name") if pre.exists() else None
    if not name:
        raise ConversionError(f"{source} has no tokenizer files and no preprocessor_config.json naming one: {hint}.")
    try:
        folder = hub.resolve(name, allow_patterns=hub.TOKENIZER_PATTERNS)
    except hub.HubError as e:
        raise ConversionError(f"{source} has no tokenizer files, and the tokenizer repo its preprocessor config "
                              f"names is not available ({str(e).rstrip('.')}): {hint}.") from None
    if not _has_tokenizer(folder):
        raise ConversionError(f"{name} has no tokenizer.json: {hint}.")
    return folder


def _tokenizer_refused(tok_folder: Path, e: Exception) -> ConversionError:
    return ConversionError(f"The tokenizer in {tok_folder} cannot be used: {str(e).splitlines()[0]} Pass "
                           "--tokenizer with the model's Qwen2.5 tokenizer.")


def _open_tokenizer(tok_folder: Path):
    """The tokenizer as `load` will open it; one that does not load is refused now, not after converting."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(tok_folder))
    except (OSError, ValueError) as e:
        raise _tokenizer_refused(tok_folder, e) from None


def _fill_token_ids(config: Dict, tok_folder: Path) -> None:
    """Record the control-token ids (the original config has none; they come from the tokenizer), looked up by
    the same resolver `load` uses, so a tokenizer that generation would refuse is refused here."""
    from ..processor import SpecialTokens

    tokenizer = _open_tokenizer(tok_folder)
    try:
        tokens = SpecialTokens.from_tokenizer(tokenizer, config.get("token_ids"))
    except (OSError, ValueError) as e:
        raise _tokenizer_refused(tok_folder, e) from None
    config["token_ids"] = {r: getattr(tokens, r) for r in ("speech_start", "speech_end", "speech_diffusion", "eos")}


# --- model card and upload -----------------------------------------------------------------------------------


def _model_card(config: Dict, name: str) -> str:
    c = config["conversion"]
    q = config.get("quantization")
    is_realtime = c["source_layout"] == REALTIME
    lms = "language models" if is_realtime else "language model"
    weights = f"{q['bits']}-bit {lms} (group size {q['group_size']}), other weights {c['dtype']}" if q \
        else c["dtype"]
    rev = f" (revision `{c['revision']}`)" if c.get("revision") else ""
    dec = config["decoder_config"]
    defaults = REALTIME_DEFAULTS if is_realtime else GENERATION_DEFAULTS
    if is_realtime:
        what = (f"Microsoft VibeVoice-Realtime-0.5B text-to-speech (model family `realtime`: hidden size "
                f"{dec['hidden_size']}, {dec['num_hidden_layers']} layers of which "
                f"{config['tts_backbone_num_hidden_layers']} TTS layers)")
        kept = "the latent scaling factors and the decoder's layer scales"
        dropped = "".join(f" `{k}` is left out, {why}." for k, why in c.get("dropped_tensors", {}).items())
        names = ", ".join(f"`{n}`" for n in PRESET_NAMES)
        use = f"""Voices are presets (no voice cloning): {names}; `vibevoice-mlx voices` lists them.

```python
import vibevoice_mlx as vv

pipe = vv.load("{name}")
result = vv.generate(pipe, "Hello from VibeVoice on MLX.", voices=["{DEFAULT_PRESET}"])
```"""
    else:
        what = (f"Microsoft VibeVoice text-to-speech (model family `vibevoice`: hidden size {dec['hidden_size']}, "
                f"{dec['num_hidden_layers']} layers)")
        kept, dropped = "the latent scaling factors and the tokenizers' layer scales", ""
        use = f"""```bash
pip install ./vibevoice-mlx   # the clone's folder; on Linux also `sudo apt-get install libblis4-pthread` for speed
vibevoice-mlx say --model {name} "Speaker 1: Hello from VibeVoice on MLX." --voice speaker1.wav -o hello.wav
```"""
    return f"""---
library_name: mlx
pipeline_tag: text-to-speech
tags:
- mlx
- vibevoice
- text-to-speech
---

# {Path(name).name}

{what} in MLX format, converted from `{c['source']}`{rev} ({c['source_layout']} layout) with {c['converter']}.

Weights: {weights}. Tensors that must stay float32 ({kept}) are float32.{dropped} The tokenizer files are
included, so loading needs no network.

## Use

vibevoice-mlx is not on PyPI: install it from a clone of its source, then speak.

{use}

Generation defaults ({defaults['steps']} diffusion steps, cfg scale {defaults['cfg_scale']}) are in
`generation_config.json`.
"""


def upload(folder: Path, repo: str) -> None:
    """Upload a converted folder to the Hugging Face repo `repo` (created if needed)."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id=repo, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model",
                          commit_message=f"Convert to MLX with {CONVERTER}")
    except Exception as e:  # network, auth, offline mode: the converted folder is still good
        raise ConversionError(f"Upload to {repo} failed ({str(e).splitlines()[0]}); the converted model is in "
                              f"{folder}: retry with `hf upload {repo} {folder}`.") from None
    logger.info("Uploaded %s to https://huggingface.co/%s", folder, repo)
