"""Speed benchmark: load, prefill, time to first audio, time per frame by stage, memory, batch throughput, and the
floor this machine's memory bandwidth sets, in one run; optionally beside transformers on the same weights.

    vibevoice-mlx bench --random-weights 1.5b --compare torch
    vibevoice-mlx bench --model vv-1.5b --frames 32 --runs 3 --batch 1,2,4,8 --json

A frame's time is the gap between two consecutive token choices (one LM step, the diffusion sampling, the
streaming decode and semantic encode), the median over the frames of every timed run; one untimed run first
compiles and warms everything. `--force-frames` (implied by `--random-weights`) makes every step a speech frame,
which a random-weight checkpoint needs to produce frames at all; the work per frame is the same. The stage split
comes from a separate instrumented pass (`MLXBackend.profile`: each stage evaluated before the next), so it costs
the timed runs nothing. Numbers drift with what else runs on the machine: compare figures from one run.
"""

import gc
import json
import logging
import math
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from . import bench_realtime, generation
from . import bench_report as report
from .bench_peers import peak_rss_gb, reset_peak_rss, synthetic_voice
from .backend import FrameSettings, greedy
from .constants import DEFAULT_CFG_SCALE, DEFAULT_STEPS, SAMPLE_RATE
from .errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_SCRIPT = "Speaker 0: Hello there."
RANDOM_SIZES = ("1.5b", "7b")  # and bench_realtime.RANDOM_SIZE


@dataclass
class BenchSettings:
    """What every timed system runs: the same script, voice, frame count and diffusion settings."""

    frames: int = 16
    runs: int = 2
    warmup: int = 1  # frames not timed at the start of each run (after the untimed warm-up run)
    steps: Optional[int] = None  # None: the family's default (10 for 1.5B/7B; 5 for realtime, bench_realtime)
    cfg_scale: Optional[float] = None  # None: 1.3 (1.5 for realtime)
    voice_seconds: float = 3.0
    script: Optional[str] = None  # None: DEFAULT_SCRIPT (realtime: bench_realtime.DEFAULT_TEXT)
    force_frames: bool = False
    profile_frames: int = 6  # frames of the instrumented stage pass (0: none)

    def with_defaults(self, steps: int, cfg_scale: float, script: str) -> "BenchSettings":
        """These settings with a model family's defaults where they were left open."""
        return replace(self, steps=self.steps or steps, script=self.script or script,
                       cfg_scale=cfg_scale if self.cfg_scale is None else self.cfg_scale)


@dataclass
class SystemResult:
    """One system timed on one model: the figures `bench` prints for it."""

    label: str  # first word of its line: "mlx", "torch" (this package's backends) or "transformers"
    system: str
    device: str
    dtype: str
    load_s: float
    prefill_s: float
    first_audio_s: Optional[float]
    frame_ms: float
    frames_timed: int
    real_time: float
    frame_ms_runs: List[float] = field(default_factory=list)
    peak_mlx_gb: Optional[float] = None  # the whole session, load included
    peak_process_gb: Optional[float] = None
    peak_mlx_run_gb: Optional[float] = None  # while generating (after the load)
    peak_process_run_gb: Optional[float] = None
    stages_ms: Dict[str, float] = field(default_factory=dict)
    prefill_stages_s: Dict[str, float] = field(default_factory=dict)
    memory: Dict[str, int] = field(default_factory=dict)
    note: str = ""

    def to_dict(self) -> Dict:
        return asdict(self)


@contextmanager
def _quiet():
    """The frame limits and short voices of a benchmark are ours, not news: keep their warnings out."""
    loggers = [logging.getLogger(f"vibevoice_mlx.{name}") for name in ("generation", "voices", "audio")]
    levels = [g.level for g in loggers]
    for g in loggers:
        g.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for g, level in zip(loggers, levels):
            g.setLevel(level)


class _Clock:
    """A sampler that stamps every token choice (and forces frames on request); the same for both backends."""

    def __init__(self, force_frames: bool):
        self.stamps: List[float] = []
        self.force = force_frames

    def __call__(self, logits, token_ids):
        token = greedy(logits, token_ids)  # same work and sync as an ordinary run
        self.stamps.append(time.perf_counter())
        return token_ids[2] if self.force else token


# --- model folders --------------------------------------------------------------------------------------------


def random_weights(size: str, root: Optional[Path] = None) -> Dict[str, Path]:
    """The seeded random checkpoint of a real configuration (architecture.md §2), in both layouts and bfloat16,
    built once into `<cache>/random-weights/` (`$VIBEVOICE_MLX_CACHE`, default ~/.cache/vibevoice-mlx): 5.4 GB
    per layout for 1.5B, 18.7 GB for 7B. Returns {"original", "transformers", "tokenizer"} -> folder."""
    from .convert.cache import cache_root

    if size not in RANDOM_SIZES:
        raise UserError(f"Unknown size {size!r}: choose one of {', '.join(RANDOM_SIZES)}.")
    folder = (root or cache_root()) / "random-weights" / f"{size}-bfloat16-seed0"
    layouts = ("original", "transformers", "tokenizer")
    done = folder / "complete"
    if not done.exists():
        try:
            from .fixtures import build
        except ImportError:
            raise UserError("--random-weights builds its checkpoint with torch: pip install 'vibevoice-mlx[torch]'.")
        logger.warning("Writing the random-weight %s checkpoint once, into %s (both layouts, bfloat16)", size, folder)
        build(folder, size, layouts[:2], seed=0, dtype="bfloat16")
        done.write_text("seed 0, bfloat16, vibevoice_mlx.fixtures\n")
    return {name: folder / name for name in layouts}


# --- timing one pipeline --------------------------------------------------------------------------------------


def _timed_run(pipe, s: BenchSettings, voices, frames: int) -> Dict:
    """One generation of `frames` frames (plus the untimed `warmup` ones) -> prefill, first audio, frame gaps."""
    clock = _Clock(s.force_frames)
    first_audio = None
    with _quiet():
        start = time.perf_counter()
        for r in generation.stream_generate(pipe, s.script, voices, sampler=clock, steps=s.steps,
                                            cfg_scale=s.cfg_scale, seed=0,
                                            max_seconds=(frames + s.warmup) * pipe.hop_length / SAMPLE_RATE):
            if first_audio is None and r.audio.size and not r.is_pause:
                first_audio = time.perf_counter() - start
    if len(clock.stamps) < 2:
        raise UserError("The model made no frame: pass --force-frames (a random-weight checkpoint needs it).")
    return {"prefill": clock.stamps[0] - start, "first_audio": first_audio,
            "gaps": list(np.diff(clock.stamps[s.warmup:]))}


def time_pipeline(pipe, s: BenchSettings, label: str, system: str, load_s: float) -> SystemResult:
    """Warm up once, then `s.runs` timed runs: medians of the prefill, first audio and per-frame gaps."""
    import mlx.core as mx

    voices = [synthetic_voice(s.voice_seconds)] if s.voice_seconds > 0 else None
    on_mlx = pipe.backend.name == "mlx"
    load_peaks = (mx.get_peak_memory() / 1e9 if on_mlx else None, peak_rss_gb())
    if on_mlx:
        mx.reset_peak_memory()
    reset_peak_rss()
    _timed_run(pipe, s, voices, 1)  # compiles the frame step and warms every cache
    runs = [_timed_run(pipe, s, voices, s.frames) for _ in range(s.runs)]
    gaps = [g for r in runs for g in r["gaps"]]
    frame = statistics.median(gaps)
    first = [r["first_audio"] for r in runs if r["first_audio"] is not None]
    backend = pipe.backend
    run_peaks = (mx.get_peak_memory() / 1e9 if on_mlx else None, peak_rss_gb())
    device = "GPU" if on_mlx and mx.default_device() == mx.gpu else "CPU" if on_mlx else _torch_device(backend)
    return SystemResult(
        label=label, system=system, device=device, dtype=backend.dtype_name, load_s=load_s,
        prefill_s=statistics.median(r["prefill"] for r in runs),
        first_audio_s=statistics.median(first) if first else None,
        frame_ms=frame * 1e3, frames_timed=len(gaps), real_time=pipe.hop_length / SAMPLE_RATE / frame,
        frame_ms_runs=[statistics.median(r["gaps"]) * 1e3 for r in runs],
        peak_mlx_gb=max(load_peaks[0], run_peaks[0]) if on_mlx else None,
        peak_process_gb=max(load_peaks[1], run_peaks[1]), peak_mlx_run_gb=run_peaks[0],
        peak_process_run_gb=run_peaks[1])


def _torch_device(backend) -> str:
    return str(next(backend.model.parameters()).device).upper()


def load_mlx(folder, tokenizer=None, dtype: Optional[str] = None, q_bits: Optional[int] = None,
             q_group_size: int = 64, max_batch: int = 8):
    """Load for benchmarking -> (pipe, seconds). `q_bits` quantizes the language model in memory, as `convert -q`
    does on disk (its layers' linears only), before the engine lays the weights out for decoding."""
    from .loader import load

    start = time.perf_counter()
    if not q_bits:
        return load(folder, dtype=dtype, tokenizer=tokenizer, max_batch=max_batch), time.perf_counter() - start
    import mlx.core as mx
    import mlx.nn as nn

    from .engine import MLXBackend
    from .loader import VibeVoice, build_model, inspect

    ckpt, config, tok, tokens = inspect(folder, tokenizer)
    if config.quantization:
        raise UserError(f"{folder} is quantized already; --q-bits quantizes a float model.")
    model = build_model(ckpt, config, dtype)
    nn.quantize(model, group_size=q_group_size, bits=q_bits, class_predicate=model.quant_predicate)
    mx.eval(model.parameters())
    pipe = VibeVoice(backend=MLXBackend(model, tokens, max_batch=max_batch), tokenizer=tok, tokens=tokens,
                     folder=ckpt.folder, config=config, defaults=dict(ckpt.generation))
    return pipe, time.perf_counter() - start


def profile_stages(pipe, s: BenchSettings) -> Dict[str, Dict[str, float]]:
    """The instrumented pass: medians per stage (ms per frame) and the prefill split (seconds)."""
    voices = [synthetic_voice(s.voice_seconds)] if s.voice_seconds > 0 else []
    backend = pipe.backend
    start = time.perf_counter()
    backend.voice_latents(voices)  # what the voice prompt costs (a run's own encode comes next, uncounted)
    voice_s = time.perf_counter() - start
    with _quiet():
        run = generation.ScriptRun(pipe, s.script, voices, generation.GenerationConfig(s.steps, s.cfg_scale, seed=0),
                                   None, None, None, time.perf_counter())
    seconds = backend.profile(run.next_job(), FrameSettings(s.steps, s.cfg_scale), s.profile_frames)
    prefill = {"voice encoder": voice_s, "language model": seconds.pop("prefill")[0]}
    return {"stages_ms": {k: statistics.median(v[1:] or v) * 1e3 for k, v in seconds.items()},
            "prefill_stages_s": prefill}


def batch_throughput(pipe, s: BenchSettings, sizes: Sequence[int]) -> List[Dict]:
    """Total frames per second with B scripts generated together (every step a frame for every row): one run per
    B, its first frame (which compiles the frame step for B rows) and the warm-up frames not timed."""
    voices = [synthetic_voice(s.voice_seconds)] if s.voice_seconds > 0 else None
    out = []
    for b in sizes:
        clocks = [_Clock(True) for _ in range(b)]
        with _quiet():
            generation.generate_batch(pipe, [s.script] * b, [voices] * b, sampler=clocks, seed=list(range(b)),
                                      steps=s.steps, cfg_scale=s.cfg_scale,
                                      max_seconds=(s.frames + s.warmup + 1) * pipe.hop_length / SAMPLE_RATE)
        step = statistics.median(np.diff(clocks[0].stamps[s.warmup + 1:]))
        out.append({"batch": b, "step_ms": step * 1e3, "frames_per_s": b / step,
                    "x_real_time": b * pipe.hop_length / SAMPLE_RATE / step})
    return out


def memory_figures(pipe, s: BenchSettings, prompt_tokens: int) -> Dict[str, int]:
    model = pipe.backend.model
    return {"weights": report.weight_bytes(model),
            "kv_cache": report.kv_cache_bytes(model, prompt_tokens + s.frames + s.warmup + 1)}


def prompt_length(pipe, s: BenchSettings) -> int:
    """Tokens of the benchmark prompt (its voice frames included)."""
    from .processor import build_prompt, parse_script

    lines = [line for item in parse_script(s.script) if hasattr(item, "lines") for line in item.lines]
    frames = [math.ceil(s.voice_seconds * SAMPLE_RATE / pipe.hop_length)] if s.voice_seconds > 0 else None
    return len(build_prompt(pipe.tokenizer, lines, frames, pipe.tokens).input_ids)


def bench_mlx(folder, s: BenchSettings, tokenizer=None, dtype: Optional[str] = None, q_bits: Optional[int] = None,
              batch: Sequence[int] = (), label: str = "mlx") -> Dict:
    """The MLX engine on one model: timed runs, the stage pass, memory, the floor, batch throughput."""
    import mlx.core as mx

    mx.reset_peak_memory()
    reset_peak_rss()
    pipe, load_s = load_mlx(folder, tokenizer, dtype, q_bits, max_batch=max([8, *batch]))
    system = "vibevoice-mlx (MLX)" + (f", {q_bits}-bit language model" if q_bits else "")
    result = time_pipeline(pipe, s, label, system, load_s)
    if s.profile_frames:
        result = replace(result, **profile_stages(pipe, s))
    tokens = prompt_length(pipe, s)
    result.memory = memory_figures(pipe, s, tokens)
    model = pipe.backend.model
    context = tokens + s.warmup + s.frames // 2  # the mean context of a timed frame
    out = {"result": result.to_dict(), "prompt_tokens": tokens, "frame_seconds": pipe.hop_length / SAMPLE_RATE,
           "bytes_per_frame": report.frame_bytes(model, s.steps, context),
           "bytes_per_frame_float16": report.frame_bytes(model, s.steps, context, itemsize=2)}
    if batch:
        out["batch"] = batch_throughput(pipe, s, batch)
    del pipe, model
    _free()
    return out


def bench_backend(folder, backend: str, s: BenchSettings, tokenizer=None, dtype: Optional[str] = None) -> Dict:
    """This package's PyTorch path (`--backends torch`): the same orchestration as MLX, on transformers' model."""
    from .loader import load

    start = time.perf_counter()
    pipe = load(folder, backend=backend, dtype=dtype, tokenizer=tokenizer)
    result = time_pipeline(pipe, s, backend, "vibevoice-mlx's PyTorch path (transformers' model)",
                           time.perf_counter() - start)
    del pipe
    _free()
    return {"result": result.to_dict()}


def _free() -> None:
    from .memory import free_memory

    gc.collect()
    free_memory()


def to_json(doc: Dict) -> str:
    return json.dumps(doc, indent=2, default=float)


# --- one bench run --------------------------------------------------------------------------------------------


def run_bench(model=None, random_size: Optional[str] = None, tokenizer=None, backends: Sequence[str] = ("mlx",),
              compare: Sequence[str] = (), torch_model=None, peer_python: Optional[str] = None,
              dtype: Optional[str] = None, q_bits: Sequence[int] = (), batch: Sequence[int] = (),
              settings: Optional[BenchSettings] = None, echo=lambda doc, part: None, voice=None) -> Dict:
    """Everything `vibevoice-mlx bench` measures, as one document; `echo(doc, part)` is called as parts finish.
    A realtime model (`config.json` `model_type` `vibevoice_streaming`) is measured by `bench_realtime.run`, with
    the preset `voice`."""
    from .bench_peers import run_peer
    from .blas import describe

    s = settings or BenchSettings()
    if random_size == bench_realtime.RANDOM_SIZE:
        folders = bench_realtime.random_weights()
        model, tokenizer, voice = folders["model"], tokenizer or folders["tokenizer"], voice or folders["voice"]
    if model is not None and bench_realtime.is_realtime(_resolve(model)):
        unsupported = [flag for flag, given in (("--compare torch", "torch" in compare), ("--batch", batch),
                                                ("--backends other than mlx", list(backends) != ["mlx"])) if given]
        if unsupported:
            raise UserError(f"{', '.join(unsupported)}: not for a realtime model (transformers has no "
                            "VibeVoice-Realtime, and its loop speaks one text at a time); drop them.")
        return bench_realtime.run(_resolve(model), s, voice, tokenizer, random_size, compare, peer_python, dtype,
                                  q_bits, echo)
    if voice is not None:
        raise UserError("--voice takes a realtime model's preset; 1.5B/7B voices come from --voice-seconds here.")
    s = s.with_defaults(DEFAULT_STEPS, DEFAULT_CFG_SCALE, DEFAULT_SCRIPT)
    if random_size:
        folders = random_weights(random_size)
        model, tokenizer = folders["original"], tokenizer or folders["tokenizer"]
        torch_model = torch_model or folders["transformers"]
        s = replace(s, force_frames=True)
    if model is None:
        raise UserError("Give --model <folder> or --random-weights 1.5b|7b|realtime-0.5b.")
    folder = _resolve(model)  # a wrong path or repo id is refused before anything is measured
    if torch_model is None and "torch" in compare:
        from .checkpoint import read_checkpoint
        from .keys import TRANSFORMERS

        if read_checkpoint(folder).layout == TRANSFORMERS:
            torch_model = model  # transformers reads this folder as it is
        else:  # refused now, not after the MLX runs are measured
            raise UserError("--compare torch times transformers on a transformers-layout checkpoint: pass "
                            "--torch-model <folder> (--random-weights has one).")
    doc = {"machine": report.machine(), "blas": describe(), "model": str(model),
           "random_weights": random_size, "settings": asdict(s), "systems": []}
    doc["bandwidth"] = report.read_bandwidth()
    echo(doc, "header")
    for name in backends:
        if name == "mlx":
            out = bench_mlx(model, s, tokenizer, dtype, batch=batch)
            doc.update({k: out[k] for k in ("prompt_tokens", "frame_seconds", "bytes_per_frame",
                                            "bytes_per_frame_float16")})
            if "batch" in out:
                doc["batch"] = out["batch"]
        else:
            out = bench_backend(model, name, s, tokenizer, dtype)
        doc["systems"].append(out["result"])
        echo(doc, "system")
    for bits in q_bits:
        out = bench_mlx(model, s, tokenizer, dtype, q_bits=bits, label=f"mlx-q{bits}")
        doc["systems"].append(out["result"])
        echo(doc, "system")
    for peer in compare:
        peer_name = "transformers" if peer == "torch" else peer
        folder = torch_model if peer_name == "transformers" else model
        peer_settings = dict(asdict(s), dtype=dtype or "float32")
        try:
            r = run_peer(peer_name, folder, peer_settings, tokenizer, peer_python if peer_name == "mlx-audio" else None)
        except RuntimeError as e:
            logger.error("%s", e)
            continue
        doc["systems"].append(dict(r, label=peer_name, first_audio_s=None))
        echo(doc, "system")
    if batch and "batch" in doc:
        bytes_f16 = sum(doc["bytes_per_frame_float16"].values())
        doc["apple_prediction"] = {str(b): report.apple_predictions(bytes_f16, b, doc["frame_seconds"])
                                   for b in (1, max(batch))}
    echo(doc, "end")
    return doc


def _resolve(model) -> Path:
    from .loader import resolve_folder

    return resolve_folder(model)


def format_bench(doc: Dict, part: str = "all") -> str:
    """The text report (or the part of it that just finished)."""
    if doc.get("family") == "realtime":
        return bench_realtime.format_doc(doc, part)
    lines: List[str] = []
    if part in ("header", "all"):
        bw = doc["bandwidth"]
        lines += [f"machine: {doc['machine']}", f"BLAS: {doc['blas']}",
                  f"memory read bandwidth: {bw['gb_per_s']:.1f} GB/s ({bw['how']})"]
        s = doc["settings"]
        lines.append(f"model: {doc['model']}" + (f" (random weights, {doc['random_weights']})"
                                                  if doc.get("random_weights") else "") +
                     f"; {s['frames']} frames x {s['runs']} runs after a warm-up run ({s['warmup']} untimed frame "
                     f"per run); {s['steps']} steps, cfg {s['cfg_scale']}; voice {s['voice_seconds']:g} s; "
                     f"{s['script']!r}" + ("; forced frames" if s["force_frames"] else ""))
    systems = doc["systems"] if part in ("end", "all") else doc["systems"][-1:] if part == "system" else []
    floor = {"bandwidth_gb_per_s": doc["bandwidth"]["gb_per_s"], "bytes_per_frame": doc.get("bytes_per_frame")}
    for r in systems if part != "end" else []:
        lines += report.format_system(r)
        if floor["bytes_per_frame"] and r["label"].startswith("mlx"):
            if r.get("stages_ms"):
                lines += report.format_stages(r, floor)
            lines += report.format_floor(r, floor)
    if part in ("end", "all"):
        lines += _ratios(doc["systems"])
        if doc.get("batch"):
            lines += report.format_batch(doc["batch"])
        for b, preds in (doc.get("apple_prediction") or {}).items():
            lines += report.format_predictions(preds, sum(doc["bytes_per_frame_float16"].values()), int(b))
    return "\n".join(lines)


def _ratios(systems: List[Dict]) -> List[str]:
    if len(systems) < 2:
        return []
    ours = [r for r in systems if r["label"] in ("mlx",) or r["label"].startswith("mlx-q")]
    peers = [r for r in systems if r not in ours]
    lines = []
    if not peers:  # variants only: against the float run
        peers = [systems[0]]
        ours = systems[1:]
    for p in peers:
        for r in ours:
            if r is p:
                continue
            line = f"{r['label']} / {p['label']} speed per frame: {p['frame_ms'] / r['frame_ms']:.2f}x"
            lines.append(line)
            lines.append(f"  prefill: {p['prefill_s'] / r['prefill_s']:.2f}x; peak process memory "
                         f"{r['peak_process_gb']:.2f} / {p['peak_process_gb']:.2f} GB")
    return lines
