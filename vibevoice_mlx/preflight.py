"""Checks made before loading any weights: do the script's prompts fit the model, and does the model fit memory.

Both read only what is cheap (config, tokenizer, safetensors headers), so a run that cannot succeed says so in a
second instead of after minutes of loading, encoding and swapping.
"""

import glob
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from .checkpoint import Checkpoint
from .constants import SAMPLE_RATE
from .errors import UserError

# What a run needs beyond weights and KV cache: activations of a prefill chunk, the frame step's buffers, the
# voice encoder's chunked pass and the allocator's slack, measured on the full-size 1.5B here (0.6 to 0.9 GB).
_OVERHEAD_BYTES = 1 << 30
_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def is_realtime(model) -> bool:
    """Whether `model` is VibeVoice-Realtime-0.5B, from its config.json alone (of a hub repo, that one file), so
    `say` and `batch` check the script, the voices and the options the realtime way before anything is loaded."""
    from .checkpoint import read_json
    from .hub import is_repo_id, resolve
    from .models import REALTIME, family

    folder = Path(model).expanduser()
    try:
        if not folder.is_dir():
            if not is_repo_id(str(model)):
                return False
            folder = resolve(str(model), allow_patterns=["config.json"])
        return family(read_json(folder / "config.json")) == REALTIME
    except (KeyError, UserError):  # not found, not readable, another model: the 1.5B path says what is wrong
        return False


def prompt_lengths(tokenizer, tokens, items, frames_per_voice: Sequence[int], num_speakers: int) -> List[int]:
    """Token count of every segment's prompt (the processor's layout, no weights needed)."""
    from .processor import Pause, build_prompt

    return [len(build_prompt(tokenizer, it.lines, frames_per_voice, tokens, num_speakers=num_speakers).input_ids)
            for it in items if not isinstance(it, Pause)]


def check_context(lengths: Sequence[int], max_positions: int, hop: int, voices: bool = True,
                  split: bool = False) -> None:
    """Every prompt must leave room to generate (architecture.md §6.6). The fix named follows what made it long:
    `voices` (voice samples were given), `split` (the script is already cut as far as it can be)."""
    for n in lengths:
        if n >= max_positions:
            fixes = [f"use shorter voice samples (each second costs {SAMPLE_RATE / hop:g} tokens)"] if voices else []
            fixes.append("shorten the script's longest word (it cannot be split further)" if split else
                         "split the script")
            raise UserError(f"The prompt has {n} tokens, more than the model's context of {max_positions}: "
                            + " or ".join(fixes) + ".")


def available_bytes() -> Optional[int]:
    """Memory a new run can use without swapping: MemAvailable on Linux; on macOS (unified memory) the free and
    reclaimable pages; None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    if sys.platform == "darwin":
        import subprocess

        try:
            out = subprocess.run(["vm_stat"], capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        page = 16384 if "page size of 16384" in out else 4096
        pages = 0
        for key in ("Pages free", "Pages inactive", "Pages speculative", "Pages purgeable"):
            for line in out.splitlines():
                if line.startswith(key):
                    pages += int(line.split(":")[1].strip().rstrip("."))
        return pages * page if pages else None
    return None


@dataclass
class MemoryEstimate:
    weights: int
    kv_cache: int
    overhead: int = _OVERHEAD_BYTES

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.overhead


def estimate(ckpt: Checkpoint, config, dtype: str, max_tokens: int, batch: int = 1) -> MemoryEstimate:
    """Bytes a run needs: the weights at `dtype` (quantized tensors as stored; the untied head's unscored rows
    are dropped after loading, architecture.md §6.3), and the KV cache of both CFG branches for `max_tokens`."""
    from safetensors import safe_open

    size = _BYTES[dtype]
    weights = 0
    quantized = bool(ckpt.quantization)
    for f in sorted(glob.glob(str(Path(ckpt.folder) / "*.safetensors"))):
        with safe_open(f, framework="numpy") as st:
            for key in st.keys():
                shape = st.get_slice(key).get_shape()
                n = math.prod(shape) if shape else 1
                if key == "lm_head.weight":
                    continue  # cut to 4 rows after loading
                stored = st.get_slice(key).get_dtype()
                if quantized and (stored in ("U32", "uint32") or key.endswith((".scales", ".biases"))):
                    weights += n * (4 if stored in ("U32", "uint32") else size)
                else:
                    weights += n * size
    # the realtime model has two LMs (lower and TTS), each with its cache; VibeVoice one
    lms = (config.lower, config.tts) if hasattr(config, "tts") else (config.decoder_config,)
    kv = sum(2 * d.num_hidden_layers * d.num_key_value_heads * (d.hidden_size // d.num_attention_heads) * size
             for d in lms)  # K and V per token per row
    return MemoryEstimate(weights, kv * 2 * batch * max_tokens)


def check_memory(ckpt: Checkpoint, config, dtype: str, max_tokens: int, batch: int = 1,
                 available: Optional[int] = None) -> MemoryEstimate:
    """Refuse a run that would not fit in memory, naming what would fit; `--force` skips this check."""
    need = estimate(ckpt, config, dtype, max_tokens, batch)
    have = available_bytes() if available is None else available
    if have is None or need.total <= have:
        return need
    gb = 1e9
    hints = []
    if dtype == "float32":
        hints.append("--dtype float16 (half the weights; fast on Apple GPUs)")
    if not ckpt.quantization:
        hints.append("a model converted with `vibevoice-mlx convert -q --q-bits 8` (or 4) for the language model")
    if config.hidden_size > 2048:
        hints.append("the 1.5B model")
    raise UserError(f"This run needs about {need.total / gb:.1f} GB (weights {need.weights / gb:.1f} GB, KV cache "
                    f"{need.kv_cache / gb:.1f} GB) but {have / gb:.1f} GB are available: it would swap. Try "
                    + "; or ".join(hints) + ". Pass --force to run anyway.")


def default_dtype_name() -> str:
    """What `load` picks when no dtype is given: float16 on a GPU, float32 on the CPU."""
    import mlx.core as mx

    return "float16" if mx.default_device() == mx.gpu else "float32"

