"""VibeVoice-Realtime-0.5B voice presets: Microsoft's `.pt` prompt caches, read without running pickle code, and the
`.safetensors` voices they are stored as (realtime.md §3).

A preset is four KV caches precomputed by Microsoft from a voice clip and a prompt text; nothing in the release makes
one from audio. The `.pt` files are `torch.save` archives of transformers 4.51 objects. `read_pt` rebuilds them with
numpy: its unpickler admits exactly the five globals those files name, so no file can make it run code, and it
honours each tensor's size, stride and offset (the K/V caches are strided views). bfloat16 is kept bit for bit as
uint16. Saved voices hold the three caches generation uses, each layer's K and V contiguous in
[kv_heads, seq, head_dim] and stacked over layers ([layers, kv_heads, seq, head_dim]), plus the negative branch's
last hidden state, and the lengths P and K+P. Dropped, since generation never reads them (§3.3): `neg_lm`, and the
values of the `lm`/`tts_lm` hidden states (about 20 % of a file).
"""

import io
import pickle
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .audio import REALTIME_VOICE_FORMAT, VOICE_FORMAT, PathLike
from .errors import MissingPathError, UserError
from .hub import file_sha256
from .output import write_atomically

PRESET_FORMAT = REALTIME_VOICE_FORMAT
PRESET_FORMAT_VERSION = 1
MODEL_FAMILY = "vibevoice-realtime"
BRANCHES = ("lm", "tts_lm", "neg_lm", "neg_tts_lm")  # the top-level keys of a .pt preset, in file order
USED = ("lm", "tts_lm", "neg_tts_lm")  # what a saved voice keeps
_INT_KEYS = ("format_version", "hidden_size", "lm_layers", "tts_layers", "kv_heads", "head_dim", "prompt_length",
             "tts_length")

# Bounds for a file that claims to be a preset; the real ones are 2.0-4.2 MB, 104 entries, a 10 KB pickle.
MAX_ARCHIVE_BYTES = 256 << 20
MAX_ENTRIES = 4096
MAX_PICKLE_BYTES = 8 << 20

_GLOBALS = {
    "collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch.BFloat16Storage",
    "transformers.modeling_outputs.BaseModelOutputWithPast", "transformers.cache_utils.DynamicCache",
}


class PresetError(UserError):
    """A file that is not a usable voice preset; the message names the cause and what to use instead."""


# --- stand-ins for the five globals: data holders only, none of them can call anything a file names ---

class _BFloat16Storage:
    """`torch.BFloat16Storage`: only a dtype tag in the persistent ids."""

    def __setstate__(self, state):
        raise pickle.UnpicklingError("BUILD on a storage type")


class _Output(dict):
    """`BaseModelOutputWithPast`: called with its 4 field values, then filled by SETITEMS and BUILD."""

    def __init__(self, last_hidden_state=None, past_key_values=None, hidden_states=None, attentions=None):
        super().__init__()

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise pickle.UnpicklingError("the output's state is not a dict")
        self.__dict__.update(state)


class _Cache:
    """`DynamicCache` in the transformers 4.51 layout: `_seen_tokens`, `key_cache`, `value_cache` lists."""

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise pickle.UnpicklingError("the cache's state is not a dict")
        self.__dict__.update(state)


class _Frozen:
    """No BUILD: a file cannot give these objects (or the classes) other contents."""

    __slots__ = ()

    def __setstate__(self, state):
        raise pickle.UnpicklingError(f"BUILD on {type(self).__name__}")


class _Storage(_Frozen):
    __slots__ = ("bits",)  # uint16, the storage's raw bfloat16 values

    def __init__(self, bits):
        self.bits = bits


class _Tensor(_Frozen):
    __slots__ = ("bits",)  # uint16, contiguous in the tensor's logical shape

    def __init__(self, bits):
        self.bits = bits


class _RebuildTensor(_Frozen):
    """`torch._utils._rebuild_tensor_v2`: a tensor view of a storage, copied out contiguous, with size, stride (in
    elements) and offset honoured and checked to stay inside the storage."""

    def __call__(self, storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                 metadata=None):
        ints = (isinstance(storage_offset, int) and isinstance(size, tuple) and isinstance(stride, tuple)
                and all(isinstance(x, int) for x in size + stride))
        if not isinstance(storage, _Storage) or not ints or len(size) != len(stride):
            raise pickle.UnpicklingError("malformed tensor record")
        if min(size + stride + (storage_offset,), default=0) < 0:
            raise pickle.UnpicklingError("negative tensor size, stride or offset")
        n = storage.bits.size
        if int(np.prod(size, dtype=np.float64)) > n:  # a preset's tensors are never larger than their storage
            raise pickle.UnpicklingError(f"a tensor of {size} in a storage of {n} values")
        if 0 not in size:
            last = storage_offset + sum((d - 1) * s for d, s in zip(size, stride))
            if last >= n:
                raise pickle.UnpicklingError(f"tensor view reaches element {last} of a storage of {n}")
        base = storage.bits[storage_offset:] if storage_offset < n else storage.bits[:0]
        view = np.lib.stride_tricks.as_strided(base, shape=size, strides=tuple(2 * s for s in stride),
                                               writeable=False)
        return _Tensor(np.ascontiguousarray(view))


_STANDINS = {
    "collections.OrderedDict": OrderedDict,
    "torch._utils._rebuild_tensor_v2": _RebuildTensor(),
    "torch.BFloat16Storage": _BFloat16Storage,
    "transformers.modeling_outputs.BaseModelOutputWithPast": _Output,
    "transformers.cache_utils.DynamicCache": _Cache,
}
assert set(_STANDINS) == _GLOBALS


class _PresetUnpickler(pickle.Unpickler):
    """find_class is the one gate for GLOBAL, STACK_GLOBAL, INST, OBJ and EXT: exactly five names pass."""

    def __init__(self, data: bytes, storages: Dict[str, bytes], path):
        super().__init__(io.BytesIO(data))
        self._storages, self._loaded, self._path = storages, {}, path

    def find_class(self, module, name):
        full = f"{module}.{name}"
        if full not in _GLOBALS:
            raise PresetError(f"{self._path}: refused to load the class {full}, which a voice preset never holds "
                              "(only the five classes of Microsoft's presets are read); the file is not a preset "
                              "or was tampered with.")
        return _STANDINS[full]

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[2], str)
                and isinstance(pid[4], int)):
            raise pickle.UnpicklingError(f"unexpected persistent id {str(pid)[:80]}")
        _, kind, key, _location, numel = pid
        if kind is not _BFloat16Storage:
            raise PresetError(f"{self._path}: a storage of type {kind!r} instead of bfloat16; voice presets are "
                              "bfloat16 only.")
        if key not in self._loaded:
            raw = self._storages.get(key)
            if raw is None:
                raise pickle.UnpicklingError(f"storage data/{key} is missing from the archive")
            if len(raw) != 2 * numel:
                raise pickle.UnpicklingError(f"storage data/{key} has {len(raw)} bytes for {numel} bfloat16 values")
            self._loaded[key] = _Storage(np.frombuffer(raw, dtype="<u2"))
        return self._loaded[key]


def _archive(path: Path) -> Tuple[bytes, Dict[str, bytes]]:
    """The pickle and the storages of a torch.save zip, within the size bounds; the root folder name varies."""
    size = path.stat().st_size
    if size > MAX_ARCHIVE_BYTES:
        raise PresetError(f"{path} is {size} bytes, larger than any voice preset ({MAX_ARCHIVE_BYTES} at most).")
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            if len(infos) > MAX_ENTRIES or sum(i.file_size for i in infos) > MAX_ARCHIVE_BYTES:
                raise PresetError(f"{path} holds {len(infos)} entries of {sum(i.file_size for i in infos)} bytes "
                                  f"in all: more than a voice preset ({MAX_ENTRIES} entries, {MAX_ARCHIVE_BYTES} "
                                  "bytes at most).")
            root = infos[0].filename.split("/")[0] if infos else ""
            names = {i.filename: i for i in infos}
            pkl = names.get(f"{root}/data.pkl")
            if pkl is None or any(not n.startswith(root + "/") for n in names):
                raise PresetError(f"{path} is a zip archive but not one written by torch.save (no <root>/data.pkl).")
            if pkl.file_size > MAX_PICKLE_BYTES:
                raise PresetError(f"{path}: its pickle is {pkl.file_size} bytes, more than a voice preset's.")
            order = z.read(names[f"{root}/byteorder"]).strip() if f"{root}/byteorder" in names else b"little"
            if order != b"little":
                raise PresetError(f"{path} was saved with byte order {order!r}; presets are little-endian.")
            prefix = f"{root}/data/"
            storages = {n[len(prefix):]: z.read(i) for n, i in names.items() if n.startswith(prefix)}
            return z.read(pkl), storages
    except (zipfile.BadZipFile, NotImplementedError, EOFError, zlib.error) as e:
        raise PresetError(f"{path} is not a voice preset: a .pt preset is a torch.save zip archive ({e}).") from None


def read_pt(path: PathLike) -> Dict[str, Dict]:
    """Read a Microsoft `.pt` voice preset without executing pickle code.

    Returns {branch: {"keys": [per layer uint16 [kv_heads, seq, head_dim]], "values": [...], "hidden": uint16
    [seq, hidden], "seen": int}} for the four branches `lm`, `tts_lm`, `neg_lm`, `neg_tts_lm`; values are the raw
    bfloat16 bits (see `bf16_to_float32`). A class other than the five a preset holds is refused by name.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"Voice preset not found: {path}")
    data, storages = _archive(path)
    try:
        top = _PresetUnpickler(data, storages, path).load()
    except PresetError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError, IndexError,
            OverflowError, RecursionError, MemoryError) as e:
        raise PresetError(f"{path} is not a readable voice preset ({type(e).__name__}: {e}).") from None
    return _check_structure(top, path)


def _check_structure(top, path) -> Dict[str, Dict]:
    def bad(what):
        return PresetError(f"{path} is not a VibeVoice-Realtime voice preset: {what}.")

    if not isinstance(top, dict) or tuple(top) != BRANCHES:
        raise bad(f"top-level keys {list(top)[:8] if isinstance(top, dict) else type(top).__name__}, "
                  f"expected {list(BRANCHES)}")
    out = {}
    for branch, value in top.items():
        cache = value.get("past_key_values") if isinstance(value, _Output) else None
        hidden = value.get("last_hidden_state") if isinstance(value, _Output) else None
        state = getattr(cache, "__dict__", {}) if isinstance(cache, _Cache) else {}
        keys, values, seen = state.get("key_cache"), state.get("value_cache"), state.get("_seen_tokens")
        if not (isinstance(hidden, _Tensor) and isinstance(keys, list) and isinstance(values, list)
                and isinstance(seen, int) and keys and len(keys) == len(values)
                and all(isinstance(t, _Tensor) for t in keys + values)):
            raise bad(f"'{branch}' is not an output with a DynamicCache of key/value tensors")
        h = hidden.bits
        shapes = {t.bits.shape for t in keys + values}
        if h.ndim != 3 or h.shape[:2] != (1, seen) or len(shapes) != 1:
            raise bad(f"'{branch}' hidden state {h.shape} and caches {sorted(shapes)} disagree")
        (shape,) = shapes
        if len(shape) != 4 or shape[0] != 1 or shape[2] != seen:
            raise bad(f"'{branch}' caches of shape {shape}, expected [1, kv_heads, {seen}, head_dim]")
        out[branch] = {"keys": [t.bits[0] for t in keys], "values": [t.bits[0] for t in values], "hidden": h[0],
                       "seen": seen}
    for a, b in (("lm", "neg_lm"), ("tts_lm", "neg_tts_lm")):
        if len(out[a]["keys"]) != len(out[b]["keys"]):
            raise bad(f"'{a}' and '{b}' have different layer counts")
    dims = {(o["keys"][0].shape[0], o["keys"][0].shape[2], o["hidden"].shape[1]) for o in out.values()}
    if len(dims) != 1:
        raise bad(f"the branches disagree on (kv_heads, head_dim, hidden_size): {sorted(dims)}")
    return out


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) to float32, exactly: bfloat16 is the upper half of a float32."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


# --- saved realtime voices ---

@dataclass(frozen=True)
class PresetShape:
    """What a realtime model needs of a preset: its lower-LM / TTS-LM layer counts and attention dimensions."""

    hidden_size: int
    lm_layers: int
    tts_layers: int
    kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config: Dict) -> "PresetShape":
        """From a realtime `config.json` (realtime.md §1.1): the decoder's 24 layers split into 4 + 20."""
        dec = config["decoder_config"]
        tts = int(config["tts_backbone_num_hidden_layers"])
        head_dim = int(dec.get("head_dim") or dec["hidden_size"] // dec["num_attention_heads"])
        return cls(int(dec["hidden_size"]), int(dec["num_hidden_layers"]) - tts, tts,
                   int(dec["num_key_value_heads"]), head_dim)

    def describe(self) -> str:
        return (f"hidden size {self.hidden_size}, {self.lm_layers}+{self.tts_layers} layers, {self.kv_heads} KV heads "
                f"of {self.head_dim}")


@dataclass
class RealtimeVoice:
    """A loaded preset. `caches[branch]` = (keys, values), each [layers, kv_heads, seq, head_dim], for `lm` (seq P),
    `tts_lm` (K+P) and `neg_tts_lm` (1): layer i's cache is `keys[i][None]`. `neg_hidden` [hidden_size] is the
    negative condition of frame 0. MLX arrays, bfloat16 unless loaded with another dtype."""

    caches: Dict[str, Tuple]
    neg_hidden: object
    meta: Dict

    @property
    def prompt_length(self) -> int:  # P
        return self.meta["prompt_length"]

    @property
    def tts_length(self) -> int:  # K + P
        return self.meta["tts_length"]

    @property
    def shape(self) -> PresetShape:
        return PresetShape(*(self.meta[k] for k in ("hidden_size", "lm_layers", "tts_layers", "kv_heads",
                                                     "head_dim")))


def preset_arrays(pt: Dict[str, Dict]) -> Dict[str, np.ndarray]:
    """The tensors of a saved voice from `read_pt`'s result, as uint16 bfloat16 bits."""
    out = {}
    for branch in USED:
        out[f"{branch}.keys"] = np.stack(pt[branch]["keys"])
        out[f"{branch}.values"] = np.stack(pt[branch]["values"])
    out["neg_tts_lm.hidden"] = np.ascontiguousarray(pt["neg_tts_lm"]["hidden"][-1])
    return out


def convert_pt(source: PathLike, target: PathLike, sha256: Optional[str] = None) -> Dict:
    """Convert a Microsoft `.pt` preset into a saved realtime voice at `target` (atomically); returns its metadata."""
    import mlx.core as mx

    source, target = Path(source), Path(target)
    pt = read_pt(source)
    keys = pt["lm"]["keys"][0]
    meta = {"format": PRESET_FORMAT, "format_version": PRESET_FORMAT_VERSION, "model_family": MODEL_FAMILY,
            "hidden_size": pt["lm"]["hidden"].shape[1], "lm_layers": len(pt["lm"]["keys"]),
            "tts_layers": len(pt["tts_lm"]["keys"]), "kv_heads": keys.shape[0], "head_dim": keys.shape[2],
            "prompt_length": pt["lm"]["seen"], "tts_length": pt["tts_lm"]["seen"], "source": source.name,
            "source_sha256": sha256 or file_sha256(source)}
    if pt["neg_tts_lm"]["seen"] != 1:
        raise PresetError(f"{source}: the negative branch covers {pt['neg_tts_lm']['seen']} positions, expected 1.")
    arrays = {k: mx.array(v).view(mx.bfloat16) for k, v in preset_arrays(pt).items()}
    info = {k: str(v) for k, v in meta.items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(target, lambda tmp: mx.save_safetensors(str(tmp), arrays, metadata=info))
    return meta


def read_meta(path: PathLike) -> Dict[str, str]:
    """The metadata of a .safetensors file (without reading its tensors); refuses files that are not safetensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for a file that is not safetensors
        raise PresetError(f"{path} is not a voice preset (cannot read it as safetensors: {e}).") from None


def load_preset(path: PathLike, shape: Optional[PresetShape] = None, dtype=None,
                known: Sequence[str] = ()) -> RealtimeVoice:
    """Load a saved realtime voice (made by `convert_pt`); with `shape`, refuse a preset made for another model size.

    `known` names the presets a refusal may suggest instead.
    """
    import mlx.core as mx

    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"Voice preset not found: {path}")
    info = read_meta(path)
    presets = f" (presets: {', '.join(known)})" if known else ""
    if info.get("format") == VOICE_FORMAT:
        raise PresetError(f"{path} is a voice saved for VibeVoice 1.5B/7B (latents of an audio clip), which "
                          f"VibeVoice-Realtime-0.5B cannot use: give it one of its voice presets{presets}.")
    if info.get("format") != PRESET_FORMAT:
        raise PresetError(f"{path} is not a realtime voice preset (format {info.get('format')!r}, expected "
                          f"{PRESET_FORMAT!r}); give a preset name or its .pt file{presets}.")
    try:
        meta: Dict = {**info, **{k: int(info[k]) for k in _INT_KEYS}}
    except (KeyError, ValueError) as e:
        raise PresetError(f"{path}: realtime voice metadata is incomplete or invalid ({e}); convert it again.") \
            from None
    if meta["format_version"] > PRESET_FORMAT_VERSION:
        raise PresetError(f"{path} uses realtime voice format version {meta['format_version']}; this vibevoice-mlx "
                          f"reads up to {PRESET_FORMAT_VERSION}: upgrade vibevoice-mlx or convert the .pt again.")
    voice = RealtimeVoice({}, None, meta)
    if shape is not None and voice.shape != shape:
        raise PresetError(f"{path} is a voice preset for another model size ({voice.shape.describe()}; this model: "
                          f"{shape.describe()}): use a preset made for this model.")
    try:
        tensors = mx.load(str(path))
    except (ValueError, RuntimeError) as e:
        raise PresetError(f"{path} is damaged ({e}); convert or download it again.") from None
    _check_tensors(tensors, meta, path)
    cast = (lambda a: a) if dtype is None else (lambda a: a.astype(dtype))
    voice.caches = {b: (cast(tensors[f"{b}.keys"]), cast(tensors[f"{b}.values"])) for b in USED}
    voice.neg_hidden = cast(tensors["neg_tts_lm.hidden"])
    return voice


def expected_shapes(meta: Dict) -> Dict[str, Tuple[int, ...]]:
    kv, hd = meta["kv_heads"], meta["head_dim"]
    out: Dict[str, Tuple[int, ...]] = {"neg_tts_lm.hidden": (meta["hidden_size"],)}
    for branch, layers, seq in (("lm", meta["lm_layers"], meta["prompt_length"]),
                                ("tts_lm", meta["tts_layers"], meta["tts_length"]),
                                ("neg_tts_lm", meta["tts_layers"], 1)):
        out[f"{branch}.keys"] = out[f"{branch}.values"] = (layers, kv, seq, hd)
    return out


def _check_tensors(tensors: Dict, meta: Dict, path: Path) -> None:
    want = expected_shapes(meta)
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != want:
        wrong: List[str] = sorted(set(got) ^ set(want)) or sorted(k for k in want if got[k] != want[k])
        raise PresetError(f"{path}: its tensors do not match its metadata ({', '.join(wrong)}); convert it again.")
