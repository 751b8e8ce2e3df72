"""Speed benchmark of VibeVoice-Realtime-0.5B: time to first audio, ms per frame by stage beside the memory-bandwidth
floor measured in the same run (realtime.md §7), x real time and peak memory, in float32, float16 and with 8-bit
language models; optionally beside mlx-audio's realtime model on the same weights.

    vibevoice-mlx bench --random-weights realtime-0.5b --compare mlx-audio --peer-python <python with mlx-audio>
    vibevoice-mlx bench --model <realtime folder> --frames 24 --runs 3 --json

`bench` comes here when the folder's `config.json` says `model_type` `vibevoice_streaming`. Each timed run is one
`vv.stream_generate` call, the way a user runs the model, with the whole text given at once (the loop takes
ids window by window; pieces of text as they arrive would start it at the same point once 5 ids are final), the
stop rule forced off (`eos_rule`) and `max_seconds` set to the frame count. First audio = from the call (text in) to
the first frame's audio out, the voice preset read and the session set up included; a frame = the gap between two
consecutive audio chunks (the median is a frame without a text window; the mean spreads each window's text over its
6 frames, and gives x real time). One untimed run warms everything first. The stage split comes from a separate
instrumented pass through the loop's own stage clock (`windows.Batch.step`), each stage evaluated before the next.
"""

import logging
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from . import bench_report as report
from .bench_peers import peak_rss_gb, reset_peak_rss
from .errors import UserError
from .windows import FRAME_STAGES, TEXT_STAGE

logger = logging.getLogger(__name__)

RANDOM_SIZE = "realtime-0.5b"
# Long enough that text windows run through every timed frame of the default settings (each id is one byte with
# the benchmark tokenizer): the costlier case, 5 ids per 6 frames.
DEFAULT_TEXT = ("The quick brown fox jumps over the lazy dog while the realtime model keeps on speaking, one text "
                "window of five ids and six speech frames at a time.")
# The README's rows: label -> bench_report.APPLE_BANDWIDTH's chip (68, 100, 400, 546 GB/s).
APPLE_CHIPS = {"M1": "M1", "M2": "M2", "M1/M2 Max": "M1 Max", "M4 Max": "M4 Max"}


def is_realtime(folder) -> bool:
    """Whether a model folder holds the realtime family (`config.json` `model_type` `vibevoice_streaming`)."""
    from .checkpoint import load_config
    from .models.realtime import MODEL_TYPE

    return load_config(Path(folder)).get("model_type") == MODEL_TYPE


def random_weights(root: Optional[Path] = None) -> Dict[str, Path]:
    """The seeded random realtime checkpoint at the released size (original layout, bfloat16, 2.0 GB), with a
    voice preset and a tokenizer, built once into `<cache>/random-weights/` like the 1.5B one. Returns {"model",
    "voice", "tokenizer"} -> path."""
    from .hub import cache_root

    folder = (root or cache_root()) / "random-weights" / f"{RANDOM_SIZE}-bfloat16-seed0"
    done = folder / "complete"
    if not done.exists():
        try:
            from .fixtures_realtime import build
        except ImportError:
            raise UserError("--random-weights builds its checkpoint with torch: pip install 'vibevoice-mlx[torch]'.")
        logger.warning("Writing the random-weight %s checkpoint once, into %s (bfloat16)", RANDOM_SIZE, folder)
        build(folder)
        done.write_text("seed 0, bfloat16, vibevoice_mlx.fixtures_realtime\n")
    return {"model": folder / "model", "voice": folder / "voice.safetensors", "tokenizer": folder / "tokenizer"}


# --- the floor (realtime.md §7.2) -------------------------------------------------------------------------------


def floor_bytes(model, steps: int, context: int = 0, neg_context: int = 0, lower_context: int = 0,
                itemsize: Optional[int] = None) -> Dict[str, Dict[str, int]]:
    """Bytes an optimized run must read: per frame by stage (both TTS-LM feeds batched, so its weights once; the
    head as `bench_report.head_bytes`; KV of `context` positive and `neg_context` negative positions), and per text
    window of 5 ids (lower LM and TTS LM over 5 positions in one call; 5 embedding rows)."""
    from .models.realtime import TEXT_WINDOW

    m = model.model
    lower, tts = m.language_model, m.tts_language_model
    cfg = model.config
    item = itemsize or tts.norm.weight.dtype.size
    kv = 2 * cfg.kv_heads * cfg.head_dim * item  # K and V of one position in one layer
    nb = report.weight_bytes
    frame = {"diffusion head": report.head_bytes(m.prediction_head, steps, itemsize),
             "decoder": nb(m.acoustic_tokenizer.decoder, itemsize),
             "TTS LM feeds + EOS": nb(tts, itemsize) + nb(m.acoustic_connector, itemsize)
             + nb(model.tts_eos_classifier, itemsize) + kv * len(tts.layers) * (context + neg_context)}
    text = nb(lower, itemsize) - nb(lower.embed_tokens, itemsize) + nb(tts, itemsize)
    text += TEXT_WINDOW * cfg.hidden_size * item + kv * (len(lower.layers) * lower_context + len(tts.layers) * context)
    return {"frame": frame, "text_window": text}


def floor_ms(nbytes: Dict, bandwidth: float) -> Dict[str, float]:
    """Milliseconds at `bandwidth` GB/s: per frame, per text window, per 6-frame window with its text, and the
    compute part of the first audio (text window, head, decoder: §7.3)."""
    from .models.realtime import SPEECH_WINDOW

    ms = lambda b: b / (bandwidth * 1e9) * 1e3  # noqa: E731
    frame, text = sum(nbytes["frame"].values()), nbytes["text_window"]
    first = text + nbytes["frame"]["diffusion head"] + nbytes["frame"]["decoder"]
    return {"frame": ms(frame), "text_window": ms(text), "window": ms(SPEECH_WINDOW * frame + text),
            "first_audio": ms(first), **{k: ms(v) for k, v in nbytes["frame"].items()}}


# --- timing -----------------------------------------------------------------------------------------------------


@dataclass
class Variant:
    dtype: str = "float32"
    q_bits: Optional[int] = None
    q_group_size: int = 64

    @property
    def label(self) -> str:
        return "mlx" + ("" if self.dtype == "float32" else f"-{self.dtype.replace('float', 'fp')}") + \
            (f"-q{self.q_bits}" if self.q_bits else "")


def load_pipeline(folder, tokenizer, v: Variant):
    """The realtime pipeline in the variant's dtype; `q_bits` quantizes both language models' linears in memory
    (`RealtimeModel.quant_predicate`, as `convert -q` does on disk). -> (pipe, seconds)."""
    import mlx.core as mx
    import mlx.nn as nn

    import vibevoice_mlx as vv

    start = time.perf_counter()
    pipe = vv.load(Path(folder), dtype=v.dtype, tokenizer=tokenizer)
    if v.q_bits:
        if pipe.config.quantization:
            raise UserError(f"{folder} is quantized already; --q-bits quantizes a float model.")
        nn.quantize(pipe.model, group_size=v.q_group_size, bits=v.q_bits, class_predicate=pipe.model.quant_predicate)
    mx.eval(pipe.model.parameters())
    return pipe, time.perf_counter() - start


def timed_run(pipe, s, voice, frames: int) -> Dict:
    """One `stream_generate` of `frames` forced frames -> first audio (s) and the gaps between audio chunks."""
    import vibevoice_mlx as vv
    from .generation import GenerationConfig

    config = GenerationConfig(steps=s.steps, cfg_scale=s.cfg_scale, seed=0,
                              max_seconds=frames * pipe.hop_length / pipe.sample_rate)
    stamps = []
    start = time.perf_counter()
    for r in vv.stream_generate(pipe, s.script, voice, config, eos_rule=lambda f, p: False):
        if r.audio.size:
            stamps.append(time.perf_counter())
    if len(stamps) != frames:
        raise RuntimeError(f"asked for {frames} frames, got {len(stamps)}")
    return {"first_audio": stamps[0] - start, "gaps": list(np.diff(stamps[s.warmup:]))}


def profile_stages(pipe, s, voice, frames: int) -> Dict[str, float]:
    """The instrumented pass: the loop's own stages (`windows.Batch.step`'s clock), each evaluated before the next;
    median ms per stage over `frames` frames (the first window's text and frame not counted), and per text window."""
    import mlx.core as mx

    from .preset_store import load_voice_preset
    from .presets import PresetShape
    from .text_stream import text_ids
    from .windows import Batch, Row, TextIds

    preset = load_voice_preset(voice, shape=PresetShape.from_config(pipe.config.raw))
    noise = mx.random.normal((max(frames, 1), pipe.config.acoustic_vae_dim), key=mx.random.key(0))
    batch = Batch(pipe.model, s.cfg_scale, s.steps, pipe.dtype)
    batch.add(Row(TextIds(text_ids(pipe.tokenizer, s.script), closed=True), lambda f: noise[f],
                  lambda f, p: False, max_frames=frames), preset)
    times: Dict[str, List[float]] = {k: [] for k in (TEXT_STAGE, *FRAME_STAGES)}

    def clock(name, fn):
        start = time.perf_counter()
        out = fn()
        mx.eval(out if out is not None else [])
        if name == TEXT_STAGE:
            mx.eval([r.state.get("h_pos") for r in batch.rows + batch.parked if r.state.get("h_pos") is not None],
                    batch.h_pos if batch.h_pos is not None else [])
        times[name].append(time.perf_counter() - start)
        return out

    while batch.active:
        batch.step(clock)
    return {k: statistics.median(v[1:] or v) * 1e3 for k, v in times.items() if v}


def bench_variant(folder, tokenizer, voice, s, v: Variant, bandwidth: float) -> Dict:
    """One variant: load, a warm-up run, `s.runs` timed runs, the stage pass, memory and the floor."""
    import mlx.core as mx

    from .models.realtime import SPEECH_WINDOW

    mx.reset_peak_memory()
    reset_peak_rss()
    pipe, load_s = load_pipeline(folder, tokenizer, v)
    timed_run(pipe, s, voice, s.warmup + 1)
    runs = [timed_run(pipe, s, voice, s.frames + s.warmup + 1) for _ in range(s.runs)]  # s.frames gaps each
    gaps = [g for r in runs for g in r["gaps"]]
    frame_s = pipe.hop_length / pipe.sample_rate
    mean = statistics.mean(gaps)
    stages = profile_stages(pipe, s, voice, s.profile_frames) if s.profile_frames else {}
    model = pipe.model
    ids = len(pipe.tokenizer.encode(s.script.strip() + "\n", add_special_tokens=False))
    preset = _preset_lengths(voice)
    frames = s.frames + s.warmup + 1
    text = min(ids, 5 * -(-frames // SPEECH_WINDOW))
    # mean contexts over the run: positive TTS LM, negative TTS LM, lower LM
    contexts = (preset["tts_length"] + text + frames // 2, 1 + frames // 2, preset["prompt_length"] + text // 2)
    nbytes = floor_bytes(model, s.steps, *contexts)
    out = {
        "label": v.label, "system": "vibevoice-mlx (MLX)" + (f", {v.q_bits}-bit language models" if v.q_bits else ""),
        "device": "GPU" if mx.default_device() == mx.gpu else "CPU", "dtype": v.dtype, "q_bits": v.q_bits,
        "load_s": load_s, "first_audio_s": statistics.median(r["first_audio"] for r in runs),
        "first_audio_runs_s": [r["first_audio"] for r in runs],
        "frame_ms": statistics.median(gaps) * 1e3, "mean_frame_ms": mean * 1e3, "frames_timed": len(gaps),
        "frame_ms_runs": [statistics.median(r["gaps"]) * 1e3 for r in runs], "real_time": frame_s / mean,
        "peak_mlx_gb": mx.get_peak_memory() / 1e9, "peak_process_gb": peak_rss_gb(),
        "stages_ms": stages, "weights_bytes": report.weight_bytes(model), "bytes": nbytes,
        "floor_ms": floor_ms(nbytes, bandwidth), "text_ids": ids, "frame_seconds": frame_s,
        # what the same frame reads with float16 weights (quantized layers as they are): the Apple prediction
        "bytes_fp16": floor_bytes(model, s.steps, *contexts, itemsize=2),
    }
    del pipe, model
    _free()
    return out


def _preset_lengths(voice) -> Dict[str, int]:
    from .presets import read_meta

    meta = read_meta(voice)
    return {k: int(meta[k]) for k in ("prompt_length", "tts_length")}


def _free() -> None:
    import gc

    from .memory import free_memory

    gc.collect()
    free_memory()


# --- one bench run ----------------------------------------------------------------------------------------------


def resolve(s):
    """The realtime defaults (realtime.md §4.10: 5 steps, cfg 1.5; a long text) where the settings left them open."""
    from . import realtime_api

    s = s.with_defaults(realtime_api.DEFAULT_STEPS, realtime_api.DEFAULT_CFG_SCALE, DEFAULT_TEXT)
    return replace(s, force_frames=True)


def variants(dtype: Optional[str], q_bits: Sequence[int]) -> List[Variant]:
    """float32 (the CPU default), float16 and 8-bit language models unless a dtype or bits are given."""
    if dtype is None and not q_bits:
        return [Variant("float32"), Variant("float16"), Variant("float32", 8)]
    base = dtype or "float32"
    return [Variant(base)] + [Variant(base, b) for b in q_bits]


def run(folder, settings, voice=None, tokenizer=None, random_size: Optional[str] = None, compare: Sequence[str] = (),
        peer_python: Optional[str] = None, dtype: Optional[str] = None, q_bits: Sequence[int] = (),
        echo=lambda doc, part: None) -> Dict:
    """Everything `bench` measures for a realtime model, as one document; `echo(doc, part)` as parts finish.
    `settings` is a `bench.BenchSettings`; the realtime defaults fill what it leaves open."""
    from .bench_peers import run_peer
    from .blas import describe

    s = resolve(settings)
    if voice is None:
        raise UserError("Benchmarking a realtime model needs a voice preset: pass --voice <preset .safetensors or "
                        ".pt>, or use --random-weights realtime-0.5b (it has one).")
    from .preset_store import resolve_voice

    voice = resolve_voice(voice)
    doc = {"family": "realtime", "machine": report.machine(), "blas": describe(), "model": str(folder),
           "voice": str(voice), "random_weights": random_size, "settings": asdict(s), "systems": []}
    doc["bandwidth"] = report.read_bandwidth()
    echo(doc, "header")
    bw = doc["bandwidth"]["gb_per_s"]
    for v in variants(dtype, q_bits):
        doc["systems"].append(bench_variant(folder, tokenizer, voice, s, v, bw))
        echo(doc, "system")
    for peer in compare:
        peer_settings = dict(asdict(s), dtype="float32", voice=str(voice), realtime=True)
        try:
            r = run_peer(peer, folder, peer_settings, tokenizer, peer_python)
        except RuntimeError as e:
            logger.error("%s", e)
            continue
        doc["systems"].append(dict(r, label=peer))
        echo(doc, "system")
    doc["targets"] = targets(doc["systems"])
    doc["apple_prediction"] = apple_prediction(doc["systems"])
    echo(doc, "end")
    return doc


def targets(systems: List[Dict]) -> Dict[str, Dict]:
    """The issue's three targets on the float32 run: per frame within 1.5x the floor, at least 2x mlx-audio (same
    dtype), first audio within one text window plus one frame (both measured in the stage pass)."""
    ours = next((r for r in systems if r["label"] == "mlx"), None)
    if ours is None:
        return {}
    out = {"frame_vs_floor": {"value": ours["frame_ms"] / ours["floor_ms"]["frame"], "target": 1.5}}
    out["frame_vs_floor"]["met"] = out["frame_vs_floor"]["value"] <= 1.5
    peer = next((r for r in systems if r["label"] == "mlx-audio"), None)
    if peer:
        speedup = peer["frame_ms"] / ours["frame_ms"]
        out["speedup_vs_mlx_audio"] = {"value": speedup, "target": 2.0, "met": speedup >= 2.0,
                                       "mean_value": peer["mean_frame_ms"] / ours["mean_frame_ms"]}
    st = ours.get("stages_ms") or {}
    if TEXT_STAGE in st:
        bound = (st[TEXT_STAGE] + ours["frame_ms"]) / 1e3
        out["first_audio"] = {"value": ours["first_audio_s"], "target": bound, "met": ours["first_audio_s"] <= bound}
    return out


def apple_prediction(systems: List[Dict]) -> List[Dict]:
    """Per frame and x real time at each Apple chip's bandwidth, from the float16 and 8-bit floors (weights read
    once per use; an upper bound on speed, not a measurement)."""
    from .models.realtime import SPEECH_WINDOW

    out, seen = [], set()
    for r in systems:
        weights = "float16" if not r.get("q_bits") else f"{r['q_bits']}-bit LMs"
        if "bytes_fp16" not in r or weights in seen:
            continue
        seen.add(weights)
        for chip, key in APPLE_CHIPS.items():
            bw = report.APPLE_BANDWIDTH[key]
            fl = floor_ms(r["bytes_fp16"], bw)
            per_frame = fl["window"] / SPEECH_WINDOW  # each window's text spread over its frames
            out.append({"chip": chip, "gb_per_s": bw, "weights": weights, "ms_per_frame": per_frame,
                        "x_real_time": r["frame_seconds"] * 1e3 / per_frame, "first_audio_ms": fl["first_audio"]})
    return out


# --- text -------------------------------------------------------------------------------------------------------


def format_doc(doc: Dict, part: str = "all") -> str:
    """The text report (or the part of it that just finished)."""
    lines: List[str] = []
    if part in ("header", "all"):
        bw, s = doc["bandwidth"], doc["settings"]
        lines += [f"machine: {doc['machine']}", f"BLAS: {doc['blas']}",
                  f"memory read bandwidth: {bw['gb_per_s']:.1f} GB/s ({bw['how']})",
                  f"model: {doc['model']}" + (f" (random weights, {doc['random_weights']})"
                                              if doc.get("random_weights") else "") + f"; voice {doc['voice']}",
                  f"{s['frames']} frames x {s['runs']} runs after a warm-up run ({s['warmup']} untimed frame per run); "
                  f"{s['steps']} steps, cfg {s['cfg_scale']}; text {s['script']!r} (whole, at once)"]
    systems = doc["systems"] if part == "all" else doc["systems"][-1:] if part == "system" else []
    for r in systems:
        lines += _format_system(r)
    if part in ("end", "all"):
        lines += _format_targets(doc.get("targets") or {})
        lines += _format_predictions(doc.get("apple_prediction") or [])
    return "\n".join(lines)


def _format_system(r: Dict) -> List[str]:
    lines = [f"{r['label']:9s} {r['dtype']:8s}: {r['frame_ms']:8.1f} ms/frame (median of {r['frames_timed']}), "
             f"{r['mean_frame_ms']:8.1f} ms/frame with the text windows, {r['real_time']:5.2f}x real time, "
             f"first audio {r['first_audio_s'] * 1e3:7.1f} ms, load {r['load_s']:5.1f} s",
             f"          {r['system']} on {r['device']}" + (f", {r['note']}" if r.get("note") else ""),
             f"          peak memory: {r['peak_process_gb']:.2f} GB process"
             + (f" ({r['peak_mlx_gb']:.2f} GB MLX)" if r.get("peak_mlx_gb") else "")]
    if len(r.get("frame_ms_runs", [])) > 1:
        lines.append("          ms/frame per run: " + ", ".join(f"{x:.1f}" for x in r["frame_ms_runs"]))
    fl = r.get("floor_ms")
    if not fl:
        return lines
    st = r.get("stages_ms") or {}
    lines.append("          stages (instrumented pass, medians)   measured      floor  bytes read  x floor")
    for name in (*FRAME_STAGES, TEXT_STAGE):
        nb = r["bytes"]["text_window"] if name == TEXT_STAGE else r["bytes"]["frame"][name]
        ms = st.get(name)
        got = f"{ms:8.1f} ms" if ms is not None else f"{'-':>8s}   "
        ratio = f"{ms / fl[name if name != TEXT_STAGE else 'text_window']:7.2f}x" if ms is not None else ""
        lines.append(f"            {name:34s}{got} {fl[name if name != TEXT_STAGE else 'text_window']:7.1f} ms "
                     f"{nb / 1e9:8.3f} GB {ratio}")
    lines.append(f"          floor: {fl['frame']:.1f} ms/frame, {fl['window']:.1f} ms per window (6 frames + text), "
                 f"first audio {fl['first_audio']:.1f} ms; achieved {r['frame_ms'] / fl['frame']:.2f}x per frame, "
                 f"{r['mean_frame_ms'] * 6 / fl['window']:.2f}x per window")
    return lines


def _format_targets(t: Dict) -> List[str]:
    lines = []
    names = {"frame_vs_floor": ("per frame / floor (float32)", "x", "<="),
             "speedup_vs_mlx_audio": ("speed per frame vs mlx-audio (float32)", "x", ">="),
             "first_audio": ("first audio vs one text window + one frame", "s", "<=")}
    for key, (label, unit, op) in names.items():
        if key in t:
            v = t[key]
            lines.append(f"target: {label}: {v['value']:.3f}{unit} ({op} {v['target']:.3f}{unit}): "
                         f"{'met' if v['met'] else 'NOT met'}")
    return lines


def _format_predictions(rows: List[Dict]) -> List[str]:
    if not rows:
        return []
    lines = ["prediction from the floor, not measured (Apple GPUs at their full memory bandwidth; an upper bound):"]
    for p in rows:
        lines.append(f"  {p['chip']:9s} {p['gb_per_s']:4d} GB/s {p['weights']:13s}: {p['ms_per_frame']:6.1f} ms/frame, "
                     f"{p['x_real_time']:5.1f}x real time, first audio {p['first_audio_ms']:5.1f} ms")
    return lines
