"""What `bench` compares its times with: this machine's memory read bandwidth, the bytes a frame must read, and
the floor they give; plus the report as text or JSON.

The floor of a stage is the weight bytes (and KV cache) an optimized frame must read in it (architecture.md §9.3:
one batched LM pass for both CFG branches, 4 lm_head rows, the diffusion head's condition and adaLN weights once
per frame and only its FFNs and the final linear per step, each tokenizer and connector once), divided by the
read bandwidth measured in the same run. Decode at these sizes is bound by memory, not arithmetic, so no stage
can beat its floor; how far above it a stage sits says where the time goes.
"""

import logging
import os
import platform
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional

import numpy as np

logger = logging.getLogger(__name__)

STAGES = ("language model", "diffusion head", "decoder", "semantic encoder", "connectors")

# Memory bandwidth of Apple-silicon chips (GB/s, Apple's published figures; binned Max parts are lower).
APPLE_BANDWIDTH = {"M1": 68, "M2": 100, "M3": 100, "M4": 120, "M1 Pro": 200, "M2 Pro": 200, "M3 Pro": 150,
                   "M4 Pro": 273, "M1 Max": 400, "M2 Max": 400, "M3 Max": 400, "M4 Max": 546, "M2 Ultra": 800}
# Thread counts of the BLAS libraries a process may load: the bandwidth reader runs them all on one thread.
BLAS_THREADS_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
                    "VECLIB_MAXIMUM_THREADS")


def read_bandwidth(gib: float = 1.0, repeats: int = 20) -> Dict:
    """Memory read bandwidth: the best of `repeats` reads of `gib` GiB of float32, in GB/s.

    On an Apple GPU an MLX sum reads it there. On a CPU every core reads a buffer of its own at once, in a fresh
    process that loads no MLX and runs its BLAS on one thread. In the bench process itself, with BLIS and MLX
    loaded, the same reads came out at 8 GB/s on the 2-core test machine where a fresh process read 16: a floor
    that slow is one the run beats.
    """
    import mlx.core as mx

    n = int(gib * 2**30) // 4
    if mx.default_device() == mx.gpu:
        a = mx.ones((n,), mx.float32)
        mx.eval(a)
        mx.eval(a.sum())
        best = min(_timed(lambda: mx.eval(a.sum())) for _ in range(repeats))
        return {"gb_per_s": n * 4 / best / 1e9, "how": f"MLX sum on the GPU, {gib:g} GiB float32"}
    threads = _cores()
    env = dict(os.environ, **{k: "1" for k in BLAS_THREADS_ENV})
    env.pop("LD_PRELOAD", None)  # the reader needs no BLAS at all
    cmd = [sys.executable, "-m", __name__, str(gib), str(threads), str(repeats)]
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=True).stdout
        gb_per_s, where = float(out.split()[-1]), "a fresh process"
    except (OSError, ValueError, IndexError, subprocess.SubprocessError) as e:
        logger.warning("Measuring the read bandwidth in a fresh process failed (%s): measuring it here", e)
        gb_per_s, where = cpu_read_bandwidth(gib, threads, repeats), "this process"
    return {"gb_per_s": gb_per_s, "how": f"numpy sum, {threads} threads in {where}, {gib:g} GiB float32, best of "
                                         f"{repeats}"}


def cpu_read_bandwidth(gib: float, threads: int, repeats: int) -> float:
    """GB/s of `threads` threads each summing its own slice of `gib` GiB at the same moment, best of `repeats`.
    Each thread fills its buffer itself (its pages land near its core) and numpy lets go of the GIL while it sums;
    a repetition lasts from the first start to the last end."""
    n = int(gib * 2**30) // 4 // threads
    barrier = threading.Barrier(threads)
    spans = [[] for _ in range(threads)]

    def reader(i):
        a = np.ones(n, np.float32)
        a.sum()
        for _ in range(repeats):
            barrier.wait()
            start = time.perf_counter()
            a.sum()
            spans[i].append((start, time.perf_counter()))

    workers = [threading.Thread(target=reader, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    best = min(max(e for _, e in run) - min(s for s, _ in run) for run in zip(*spans))
    return n * threads * 4 / best / 1e9


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _nbytes(module, itemsize: Optional[int] = None) -> int:
    """Bytes of a module's parameters; `itemsize` re-prices the floating ones (float16: 2), quantized ones stay."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    total = 0
    for _, v in tree_flatten(module.parameters()):
        floating = mx.issubdtype(v.dtype, mx.floating)
        total += v.size * itemsize if itemsize and floating else v.nbytes
    return total


def frame_bytes(model, steps: int, context: int, rows: int = 2, itemsize: Optional[int] = None) -> Dict[str, int]:
    """Bytes per stage one optimized frame reads, for a context of `context` tokens per LM row."""
    m = model.model
    lm, head = m.language_model, m.prediction_head
    args = model.config.decoder_config
    kv_dim = args.num_key_value_heads * (args.hidden_size // args.num_attention_heads)
    kv_item = itemsize or lm.embed_tokens.weight.dtype.size
    kv = rows * context * len(lm.layers) * 2 * kv_dim * kv_item
    control_rows = 4 * args.hidden_size * 4  # the float32 lm_head rows of the four control tokens
    return {
        "language model": _nbytes(lm, itemsize) - _nbytes(lm.embed_tokens, itemsize) + control_rows + kv,
        "diffusion head": head_bytes(head, steps, itemsize),
        "decoder": _nbytes(m.acoustic_tokenizer.decoder, itemsize),
        "semantic encoder": _nbytes(m.semantic_tokenizer.encoder, itemsize),
        "connectors": _nbytes(m.acoustic_connector, itemsize) + _nbytes(m.semantic_connector, itemsize),
    }


def head_bytes(head, steps: int, itemsize: Optional[int] = None) -> int:
    """Bytes the diffusion head reads for one frame of `steps` steps: its condition and adaLN weights once, its
    FFNs, norms, input projection and final linear every step (the t-embeddings are constants)."""
    once = _nbytes(head.cond_proj, itemsize) + sum(_nbytes(layer.adaLN_modulation[1], itemsize)
                                                   for layer in head.layers)
    once += _nbytes(head.final_layer.adaLN_modulation[1], itemsize)
    per_step = _nbytes(head.noisy_images_proj, itemsize) + _nbytes(head.final_layer.linear, itemsize)
    per_step += sum(_nbytes(layer.ffn, itemsize) + _nbytes(layer.norm, itemsize) for layer in head.layers)
    return once + steps * per_step


def weight_bytes(model, itemsize: Optional[int] = None) -> int:
    """Bytes of a model's (or module's) parameters; `itemsize` re-prices the floating ones as `_nbytes` does."""
    return _nbytes(model, itemsize)


def kv_cache_bytes(model, tokens: int, rows: int = 2, step: int = 256) -> int:
    """What mlx-lm's batch cache holds for `rows` rows of up to `tokens` tokens (it grows in steps of 256)."""
    args = model.config.decoder_config
    kv_dim = args.num_key_value_heads * (args.hidden_size // args.num_attention_heads)
    slots = -(-tokens // step) * step
    item = model.model.language_model.embed_tokens.weight.dtype.size
    return rows * slots * args.num_hidden_layers * 2 * kv_dim * item


def apple_predictions(bytes_f16: int, batch: int = 1, frame_s: float = 3200 / 24000) -> List[Dict]:
    """Frames per second the bandwidth of each Apple chip allows for one frame of `bytes_f16` float16 weights:
    a prediction (an upper bound: no chip reaches its full bandwidth, and none was measured here). A batch reads
    the weights once per step for all its rows, so B rows make B frames for about the same bytes."""
    out = []
    for chip, bw in APPLE_BANDWIDTH.items():
        step_s = bytes_f16 / (bw * 1e9)
        out.append({"chip": chip, "gb_per_s": bw, "ms_per_frame": step_s * 1e3 / batch,
                    "frames_per_s": batch / step_s, "x_real_time": batch * frame_s / step_s})
    return out


def machine() -> str:
    import mlx.core as mx

    device = "GPU" if mx.default_device() == mx.gpu else "CPU"
    return (f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"MLX default device {device}")


# --- text ---------------------------------------------------------------------------------------------------


# A time below its floor means the bandwidth was measured too low (a busy machine), not a stage beating memory.
BELOW_FLOOR_MARK = "(!)"
UNRELIABLE = ("below 1.0x, so the floor is unreliable: the read bandwidth measured low (the machine was probably "
              "busy); run bench again")


def _gb(b: float) -> str:
    return f"{b / 1e9:.2f} GB"


def format_system(r: Dict) -> List[str]:
    """Lines for one system's result (see `bench.SystemResult.to_dict`)."""
    name = r["label"]
    line = (f"{name:5s} {r['dtype']:8s}: {r['frame_ms']:8.1f} ms/frame (median of {r['frames_timed']}), "
            f"{r['real_time']:5.2f}x real time, prefill {r['prefill_s']:5.2f} s")
    if r.get("first_audio_s") is not None:
        line += f", first audio {r['first_audio_s']:5.2f} s"
    line += f", load {r['load_s']:5.1f} s"
    lines = [line, f"      {r['system']} on {r['device']}" + (f", {r['note']}" if r.get("note") else "")]
    if r.get("peak_process_gb"):
        peak = f"      peak memory: {r['peak_process_gb']:.2f} GB process"
        if r.get("peak_mlx_gb"):
            peak += f" ({r['peak_mlx_gb']:.2f} GB MLX)"
        if r.get("peak_process_run_gb"):
            peak += f", {r['peak_process_run_gb']:.2f} GB while generating"
            peak += f" ({r['peak_mlx_run_gb']:.2f} GB MLX)" if r.get("peak_mlx_run_gb") else ""
        lines.append(peak)
    if len(r.get("frame_ms_runs", [])) > 1:
        lines.append("      ms/frame per run: " + ", ".join(f"{x:.1f}" for x in r["frame_ms_runs"]))
    return lines


def format_stages(r: Dict, floor: Dict) -> List[str]:
    """The instrumented stage timings beside each stage's floor."""
    stages, bw = r["stages_ms"], floor["bandwidth_gb_per_s"]
    lines = ["      stages per frame (instrumented pass, medians)   measured      floor  bytes read  x floor"]
    total_ms = total_floor = 0.0
    for name in STAGES:
        ms = stages.get(name)
        nb = floor["bytes_per_frame"][name]
        fl = nb / (bw * 1e9) * 1e3
        total_floor += fl
        if ms is None:
            continue
        total_ms += ms
        lines.append(f"        {name:40s} {ms:8.1f} ms {fl:7.1f} ms {_gb(nb):>10s} {_x_floor(ms / fl)}")
    rest = stages.get("token choice")
    if rest is not None:
        total_ms += rest
        lines.append(f"        {'token choice (4 logits, argmax)':40s} {rest:8.1f} ms")
    lines.append(f"        {'sum':40s} {total_ms:8.1f} ms {total_floor:7.1f} ms "
                 f"{_gb(sum(floor['bytes_per_frame'].values())):>10s} {_x_floor(total_ms / total_floor)}")
    if any(line.endswith(BELOW_FLOOR_MARK) for line in lines):
        lines.append(f"      {BELOW_FLOOR_MARK} {UNRELIABLE}")
    if r.get("prefill_stages_s"):
        lines.append("      prefill: " + ", ".join(f"{k} {v:.2f} s" for k, v in r["prefill_stages_s"].items()))
    return lines


def _x_floor(ratio: float) -> str:
    """A stage's time over its floor, marked when it is below 1.0, which no stage can really be."""
    return f"{ratio:7.2f}x" + (f" {BELOW_FLOOR_MARK}" if ratio < 1.0 else "")


def format_floor(r: Dict, floor: Dict) -> List[str]:
    per_frame = sum(floor["bytes_per_frame"].values())
    fl = per_frame / (floor["bandwidth_gb_per_s"] * 1e9) * 1e3
    lines = [f"      floor: {fl:.0f} ms/frame ({_gb(per_frame)} at {floor['bandwidth_gb_per_s']:.1f} GB/s); "
             f"achieved {r['frame_ms'] / fl:.2f}x the floor"]
    if r["frame_ms"] < fl:
        lines[0] += f": {UNRELIABLE}"
    mem = r.get("memory")
    if mem:
        need = mem["weights"] + mem["kv_cache"]
        over = [f"{label} {r[key]:.2f} GB ({(r[key] * 1e9 / need - 1) * 100:+.0f} %)"
                for label, key in (("peak", "peak_process_gb"), ("while generating", "peak_process_run_gb"))
                if r.get(key)]
        lines.append(f"      memory: weights {_gb(mem['weights'])} + KV cache {_gb(mem['kv_cache'])} = {_gb(need)}; "
                     "process " + ", ".join(over))
    return lines


def format_batch(rows: List[Dict]) -> List[str]:
    lines = ["batch throughput (B scripts at once, every step a frame for every row):"]
    base = rows[0]["frames_per_s"] if rows else None
    for b in rows:
        lines.append(f"  B={b['batch']}: {b['step_ms']:8.1f} ms/step, {b['frames_per_s']:6.2f} frames/s "
                     f"({b['frames_per_s'] / base:4.2f}x B={rows[0]['batch']}), {b['x_real_time']:5.2f}x real time "
                     "in all")
    return lines


def format_predictions(predictions: List[Dict], bytes_f16: int, batch: int = 1) -> List[str]:
    lines = [f"prediction, not measured: Apple GPUs in float16, B={batch} ({_gb(bytes_f16)} of weights per step "
             "at the full memory bandwidth; an upper bound)"]
    for p in predictions:
        lines.append(f"  {p['chip']:9s} {p['gb_per_s']:4d} GB/s: {p['frames_per_s']:6.1f} frames/s, "
                     f"{p['x_real_time']:5.2f}x real time")
    return lines


if __name__ == "__main__":  # the bandwidth reader's fresh process (see read_bandwidth)
    print(cpu_read_bandwidth(float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
