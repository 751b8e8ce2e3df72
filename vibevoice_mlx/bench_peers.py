"""Peers for `bench --compare`, each timed the way its own users run it, on the same weights as the MLX run:

* transformers: `VibeVoiceForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)` and
  `generate(..., num_diffusion_steps=10, guidance_scale=1.3)` with a logits processor that leaves only the
  speech-diffusion token (and stamps the time of each token choice). Nothing else is changed: the scheduler,
  the σ-VAE voice noise and the CFG logits processor transformers adds for guidance_scale != 1 are its own.
* mlx-audio (not a dependency; from another Python that has it, `--peer-python`): `load_model(folder)`,
  `set_dtype(float32)`, `generate(...)` with its token choice forced to the speech-diffusion token. Its
  VibeVoice-Realtime (the same `load_model`, a voice cache in `voices/`): `generate(text, voice=..., stream=True,
  streaming_interval=0)` with its EOS classifier forced to go on (`mlx_audio_realtime_peer`).

Each peer runs in a child process (`python -m vibevoice_mlx.bench_peers <peer> ...`) so that its peak memory is
its own and its libraries do not meet ours (torch runs on its own BLAS; the child gets no BLAS preload). The
child prints one JSON line; this module imports nothing heavy at the top, so it runs in a foreign environment.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

PEERS = ("transformers", "mlx-audio")


def peak_rss_gb() -> float:
    """This process's resident-memory high-water mark. Linux: VmHWM, which `reset_peak_rss` can restart (the
    rusage figure cannot, and a child exec'd from a large parent inherits the parent's)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e9 if sys.platform == "darwin" else peak * 1024 / 1e9  # bytes on macOS, KiB on Linux


def reset_peak_rss() -> None:
    """Restart the high-water mark at the current resident size (Linux; elsewhere a no-op)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def synthetic_voice(seconds: float):
    """The voice prompt every benchmarked system gets: a 180 Hz tone in seeded noise, 24 kHz float32."""
    import numpy as np

    t = np.arange(int(seconds * 24000)) / 24000
    rng = np.random.default_rng(0)
    return (0.1 * np.sin(2 * np.pi * 180 * t) + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def _summary(runs: List[Dict], load_s: float, hop: int, dtype: str, device: str) -> Dict:
    gaps = [g for r in runs for g in r["gaps"]]
    frame = statistics.median(gaps)
    prefill = [r["prefill"] for r in runs if "prefill" in r]  # the realtime model has none (the preset is it)
    return {"load_s": load_s, "prefill_s": statistics.median(prefill) if prefill else None,
            "frame_ms": frame * 1e3, "frames_timed": len(gaps), "real_time": hop / 24000 / frame,
            "frame_ms_runs": [statistics.median(r["gaps"]) * 1e3 for r in runs], "dtype": dtype, "device": device,
            "peak_process_gb": peak_rss_gb()}


# --- transformers -------------------------------------------------------------------------------------------


def transformers_peer(folder: str, tokenizer: Optional[str], s: Dict) -> Dict:
    """Time transformers' own `generate` on a transformers-layout folder (float32 on the CPU)."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer, LogitsProcessor, LogitsProcessorList, VibeVoiceForConditionalGeneration
    from transformers.models.vibevoice_acoustic_tokenizer import VibeVoiceAcousticTokenizerFeatureExtractor

    from .processor import SpecialTokens, build_prompt, parse_script

    start = time.perf_counter()
    model = VibeVoiceForConditionalGeneration.from_pretrained(folder, dtype=getattr(torch, s.get("dtype",
                                                                                               "float32")))
    model.eval()
    load_s = time.perf_counter() - start
    cfg = model.config
    hop = cfg.audio_config.hop_length
    # The prompt vibevoice-mlx builds for the same script (the original layout, §5.4): the same token count.
    tok = AutoTokenizer.from_pretrained(tokenizer or folder)
    tokens = SpecialTokens.from_tokenizer(tok)
    lines = [line for item in parse_script(s["script"]) if hasattr(item, "lines") for line in item.lines]
    kwargs = {}
    frames = None
    if s["voice_seconds"] > 0:
        voice = synthetic_voice(s["voice_seconds"])
        extractor = VibeVoiceAcousticTokenizerFeatureExtractor(sampling_rate=24000, pad_to_multiple_of=hop)
        features = extractor([voice], sampling_rate=24000, return_tensors="pt")
        kwargs = {"input_values": features["input_values"].to(model.dtype), "padding_mask": features["padding_mask"]}
        frames = [-(-len(voice) // hop)]
    ids = torch.tensor([build_prompt(tok, lines, frames, tokens).input_ids])

    class OnlyDiffusion(LogitsProcessor):
        def __init__(self):
            self.stamps: List[float] = []

        def __call__(self, input_ids, scores):
            self.stamps.append(time.perf_counter())
            out = torch.full_like(scores, float("-inf"))
            out[:, cfg.audio_token_id] = 0.0
            return out

    def run(n):
        clock = OnlyDiffusion()
        begin = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), num_diffusion_steps=s["steps"],
                           guidance_scale=s["cfg_scale"], max_new_tokens=n + s["warmup"] + 1,
                           logits_processor=LogitsProcessorList([clock]), **kwargs)
        return {"prefill": clock.stamps[0] - begin, "gaps": list(np.diff(clock.stamps[s["warmup"]:]))}

    run(1)
    runs = [run(s["frames"]) for _ in range(s["runs"])]
    out = _summary(runs, load_s, hop, str(model.dtype).replace("torch.", ""), "CPU")
    out.update(system=f"transformers {_version('transformers')} (torch {torch.__version__}, "
                      f"{torch.get_num_threads()} threads)",
               note="audio comes back when generate returns (no streaming)")
    return out


# --- mlx-audio ----------------------------------------------------------------------------------------------


def mlx_audio_peer(folder: str, tokenizer: Optional[str], s: Dict) -> Dict:
    """Time mlx-audio's VibeVoice on an original-layout folder (float32), its token choice forced to frames."""
    from .blas import use_fast_blas

    use_fast_blas()  # its best setting on Linux, as for vibevoice-mlx
    if s.get("realtime"):
        return mlx_audio_realtime_peer(folder, tokenizer, s)
    import mlx.core as mx
    import numpy as np
    from mlx_audio.tts.utils import load_model

    work = _mlx_audio_folder(folder, tokenizer)
    # A tied 1.5B checkpoint may leave lm_head.weight out (ours do; the released one stores the copy), and
    # mlx-audio loads strictly: give it the tie as one more shard, the embedding matrix under the head's name.
    weights = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        weights.update(mx.load(str(f)))
    if "lm_head.weight" not in weights:
        mx.save_safetensors(str(work / "tied-lm-head.safetensors"),
                            {"lm_head.weight": weights["model.language_model.embed_tokens.weight"]})
    del weights
    start = time.perf_counter()
    model = load_model(str(work), lazy=True)
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    load_s = time.perf_counter() - start
    model._resolve_non_streaming_token_ids()  # its control ids, from the tokenizer it loaded
    diffusion = int(model.speech_diffusion_id)
    original = model._select_non_streaming_next_token
    stamps: List[float] = []

    def forced(*args, **kwargs):
        original(*args, **kwargs)  # the same work and sync as an ordinary choice (it returns a Python int)
        stamps.append(time.perf_counter())
        return diffusion

    model._select_non_streaming_next_token = forced
    voice = synthetic_voice(s["voice_seconds"]) if s["voice_seconds"] > 0 else None

    def run(n):
        stamps.clear()
        begin = time.perf_counter()
        for _ in model.generate(s["script"], max_tokens=n + s["warmup"] + 1, cfg_scale=s["cfg_scale"],
                                ddpm_steps=s["steps"], ref_audio=None if voice is None else mx.array(voice)):
            pass
        return {"prefill": stamps[0] - begin, "gaps": list(np.diff(stamps[s["warmup"]:]))}

    run(1)
    runs = [run(s["frames"]) for _ in range(s["runs"])]
    out = _summary(runs, load_s, 3200, "float32", "CPU" if mx.default_device() == mx.cpu else "GPU")
    out.update(system=f"mlx-audio {_version('mlx-audio')} (MLX {mx.__version__})")
    return out


def _mlx_audio_folder(folder, tokenizer) -> Path:
    """A folder of links to `folder` whose preprocessor_config.json names `tokenizer`: mlx-audio reads its tokenizer
    from the folder that file names (a hub id otherwise)."""
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="vv-mlx-audio-"))
    for f in Path(folder).iterdir():
        (work / f.name).symlink_to(f.resolve())
    pre = json.loads((Path(folder) / "preprocessor_config.json").read_text())
    pre["language_model_pretrained_name"] = str(Path(tokenizer or folder).resolve())
    (work / "preprocessor_config.json").unlink()
    (work / "preprocessor_config.json").write_text(json.dumps(pre))
    return work


def _mlx_audio_voice(preset: str, target: Path) -> None:
    """Our saved realtime voice in mlx-audio's voice-cache layout (`voices/<name>.safetensors`: per-layer
    `<branch>_key_<i>` [1, kv_heads, seq, head_dim] and `<branch>_hidden`). Our voices keep only the negative
    branch's last hidden state (generation reads no other); the positive branches' hidden states are zeros of the
    right length (mlx-audio reads only their last row, after a text window replaced it)."""
    import mlx.core as mx

    t = mx.load(preset)
    hidden = t["neg_tts_lm.hidden"].shape[-1]
    out = {"neg_tts_lm_hidden": t["neg_tts_lm.hidden"].reshape(1, 1, hidden)}
    for branch in ("lm", "tts_lm", "neg_tts_lm"):
        keys, values = t[f"{branch}.keys"], t[f"{branch}.values"]
        for i in range(keys.shape[0]):
            out[f"{branch}_key_{i}"], out[f"{branch}_value_{i}"] = keys[i][None], values[i][None]
        if branch != "neg_tts_lm":
            out[f"{branch}_hidden"] = mx.zeros((1, keys.shape[2], hidden), keys.dtype)
    target.parent.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(target), out)


def mlx_audio_realtime_peer(folder: str, tokenizer: Optional[str], s: Dict) -> Dict:
    """Time mlx-audio's VibeVoice-Realtime as its users stream it: `load_model(folder)`, then `generate(text,
    voice=<name>, stream=True, streaming_interval=0)` (one frame per chunk, as vibevoice-mlx streams; float32 like
    the CPU default). Its EOS classifier is forced to "go on" (computed first: the same work and sync) and
    `max_tokens` ends the run after the same frame count; stamps at each chunk out."""
    import mlx.core as mx
    import numpy as np
    from mlx_audio.tts.utils import load_model

    work = _mlx_audio_folder(folder, tokenizer)
    (work / "voices").mkdir()
    _mlx_audio_voice(s["voice"], work / "voices" / "bench.safetensors")
    start = time.perf_counter()
    model = load_model(str(work), lazy=True)
    model.set_dtype(getattr(mx, s.get("dtype", "float32")))
    mx.eval(model.parameters())
    load_s = time.perf_counter() - start
    eos = model.tts_eos_classifier

    class NeverStop:
        def __call__(self, h):
            return eos(h) * 0 - 30.0  # sigmoid(-30) < 0.5: it computes its logit, then goes on

    model.tts_eos_classifier = NeverStop()

    def run(n):
        stamps = []
        begin = time.perf_counter()
        for r in model.generate(s["script"], max_tokens=n, cfg_scale=s["cfg_scale"], ddpm_steps=s["steps"],
                                voice="bench", stream=True, streaming_interval=0):
            if r.samples:
                stamps.append(time.perf_counter())
        if len(stamps) != n:
            raise RuntimeError(f"mlx-audio made {len(stamps)} chunks, expected {n}")
        return {"first_audio": stamps[0] - begin, "gaps": list(np.diff(stamps[s["warmup"]:]))}

    run(s["warmup"] + 1)
    runs = [run(s["frames"] + s["warmup"] + 1) for _ in range(s["runs"])]  # s["frames"] gaps each
    out = _summary(runs, load_s, 3200, s.get("dtype", "float32"), "CPU" if mx.default_device() == mx.cpu else "GPU")
    gaps = [g for r in runs for g in r["gaps"]]
    out.update(system=f"mlx-audio {_version('mlx-audio')} (MLX {mx.__version__}), stream=True, "
                      "streaming_interval=0", first_audio_s=statistics.median(r["first_audio"] for r in runs),
               first_audio_runs_s=[r["first_audio"] for r in runs], mean_frame_ms=statistics.mean(gaps) * 1e3,
               peak_mlx_gb=mx.get_peak_memory() / 1e9, real_time=3200 / 24000 / statistics.mean(gaps))
    return out


def _version(dist: str) -> str:
    from importlib.metadata import version

    try:
        return version(dist)
    except Exception:
        return "?"


# --- the child process and its parent -----------------------------------------------------------------------


def check_peer_python(python: str) -> Optional[str]:
    """Why `python` cannot run the mlx-audio peer (a one-line reason), or None: checked before anything is timed."""
    try:
        proc = subprocess.run([python, "-c", "import mlx_audio"], capture_output=True, text=True, timeout=120)
    except OSError as e:
        return (f"--peer-python {python}: cannot run it ({e.strerror}); give the python of an environment with "
                "mlx-audio.")
    if proc.returncode != 0:
        return (f"--peer-python {python} cannot import mlx_audio: install it there "
                "(pip install 'mlx[cpu]' mlx-audio on Linux, pip install mlx-audio on a Mac).")
    return None


def run_peer(peer: str, folder, settings: Dict, tokenizer=None, python: Optional[str] = None,
             timeout: Optional[float] = None) -> Dict:
    """Run one peer in a child process and return its figures (raises RuntimeError with its stderr tail)."""
    from .blas import classify

    if peer not in PEERS:
        raise ValueError(f"unknown peer {peer!r}: choose one of {', '.join(PEERS)}")
    env = dict(os.environ)
    # The child runs on its own libraries: no BLAS preloaded into torch (mlx-audio's child loads ours itself).
    preload = [p for p in env.get("LD_PRELOAD", "").split(":") if p and classify(p) not in ("OpenBLAS", "BLIS")]
    env.pop("LD_PRELOAD", None)
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    cmd = [python or sys.executable, "-m", "vibevoice_mlx.bench_peers", peer, "--model", str(folder),
           "--settings", json.dumps(settings)] + (["--tokenizer", str(tokenizer)] if tokenizer else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"{peer} peer failed (exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Time one bench peer; prints one JSON line.")
    p.add_argument("peer", choices=PEERS)
    p.add_argument("--model", required=True)
    p.add_argument("--tokenizer")
    p.add_argument("--settings", required=True, help="JSON: frames, runs, warmup, steps, cfg_scale, script, ...")
    args = p.parse_args(argv)
    fn = transformers_peer if args.peer == "transformers" else mlx_audio_peer
    out = fn(args.model, args.tokenizer, json.loads(args.settings))
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
