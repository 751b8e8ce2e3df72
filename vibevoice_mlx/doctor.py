"""`vibevoice-mlx doctor`: what a user needs to know about this machine before a first run.

Platform, Python, MLX and its backend, memory, torch and its accelerators, which model and precision fit, and
what is missing with the command that fixes it. Nothing here needs torch; it is reported if installed.
"""

import importlib.metadata
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
from typing import Dict, List, Optional

from . import blas

GB = 1024**3

# Runtime dependencies (import name, distribution, requirement as pyproject.toml pins it).
_CORE = [
    ("mlx_lm", "mlx-lm", "mlx-lm>=0.32.2,<0.33"),
    ("numpy", "numpy", "numpy>=1.26,<3"),
    ("safetensors", "safetensors", "safetensors>=0.6,<1"),
    ("huggingface_hub", "huggingface_hub", "huggingface_hub>=1.0,<3"),
    ("soundfile", "soundfile", "soundfile>=0.13,<0.15"),
    ("soxr", "soxr", "soxr>=0.5,<2"),
]
_TORCH_FIX = "pip install 'vibevoice-mlx[torch]'"


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def system_memory_bytes() -> Optional[int]:
    """Physical memory (unified memory on Apple silicon), or None if it cannot be read."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        pass
    if sys.platform == "darwin":
        try:
            return int(subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True, text=True,
                                      timeout=5).stdout.strip())
        except (OSError, ValueError, subprocess.SubprocessError):
            return None
    return None


def recommend(memory_gb: Optional[float], backend: Optional[str] = None) -> Dict[str, str]:
    """Which checkpoint and precision fit `memory_gb` of (unified) memory on MLX's `backend`.

    1.5B has 2.7B parameters (5.4 GB in float16, 11 GB in float32), 7B has 9.3B (18.6 GB, 37 GB); an 8-bit
    language model brings 7B to about 11 GB, a 4-bit one to about 7.5 GB. macOS lets the GPU wire roughly 70-75 %
    of unified memory. On the CPU backend quantized matmuls are the slowest path (the loader warns about them)
    and 16-bit ones skip BLAS, so there the advice is float32 without quantization.
    """
    if backend == "CPU":
        return _recommend_cpu(memory_gb)
    if memory_gb is None:
        return {"model": "VibeVoice-1.5B", "precision": "float16",
                "why": "memory size unknown: start with the smaller model"}
    if memory_gb < 12:
        return {"model": "VibeVoice-1.5B", "precision": "float16 (8-bit language model if memory is tight)",
                "why": f"{memory_gb:.0f} GB: the 7B model does not fit; 1.5B in float16 needs about 6 GB"}
    if memory_gb < 32:
        return {"model": "VibeVoice-7B", "precision": "8-bit language model (4-bit leaves more room)",
                "why": f"{memory_gb:.0f} GB: 7B in float16 needs about 19 GB; with a 4/8-bit language model "
                       "it needs 8 to 11 GB"}
    return {"model": "VibeVoice-7B", "precision": "float16",
            "why": f"{memory_gb:.0f} GB: 7B in float16 (about 19 GB) fits"}


_CPU_WHY = ("MLX's CPU backend runs float32 matmuls on BLAS; 4/8-bit ones are its slowest path (a 4-bit 7B layer: "
            "75x slower) and 16-bit ones about 2x slower, so convert without -q")


def _recommend_cpu(memory_gb: Optional[float]) -> Dict[str, str]:
    # Measured here: the 1.5B model in float32 peaks at 11.1 GB; 7B in float32 holds 37 GB of weights.
    if memory_gb is not None and memory_gb >= 48:
        return {"model": "VibeVoice-7B", "precision": "float32, not quantized",
                "why": f"{memory_gb:.0f} GB: 7B in float32 (about 37 GB) fits; {_CPU_WHY}"}
    if memory_gb is None or memory_gb >= 16:
        size = "memory size unknown" if memory_gb is None else f"{memory_gb:.0f} GB"
        return {"model": "VibeVoice-1.5B", "precision": "float32, not quantized",
                "why": f"{size}: 1.5B in float32 needs about 11 GB, 7B about 37 GB; {_CPU_WHY}"}
    return {"model": "VibeVoice-1.5B", "precision": "float16, not quantized (float32 does not fit)",
            "why": f"{memory_gb:.0f} GB: 1.5B in float32 needs about 11 GB, in float16 about 6 GB; {_CPU_WHY}"}


def _mlx_info() -> Dict:
    info = {"version": _version("mlx"), "backend": None, "device": None, "error": None}
    try:
        import mlx.core as mx
    except ImportError as err:  # no wheel, or the Linux wheel without a backend (libmlx.so)
        info["error"] = f"{type(err).__name__}: {err}"
        return info
    if mx.metal.is_available():
        info["backend"] = "Metal GPU"
    elif hasattr(mx, "cuda") and mx.cuda.is_available():
        info["backend"] = "CUDA"
    else:
        info["backend"] = "CPU"
    info["device"] = str(mx.default_device())
    if info["backend"] == "CPU":
        # The BLAS it runs on decides generation speed there: which library, how it got in, GFLOP/s.
        info["blas"] = blas.blas_report()
        info["cpu_gflops"] = info["blas"]["gflops"]
    return info


def _torch_info() -> Dict:
    info = {"version": _version("torch"), "transformers": _version("transformers"),
            "diffusers": _version("diffusers"), "mps": False, "cuda": False}
    if info["version"] is None:
        return info
    try:
        import torch
    except ImportError as err:
        info["error"] = f"{type(err).__name__}: {err}"
        return info
    info["mps"] = bool(torch.backends.mps.is_available())
    info["cuda"] = bool(torch.cuda.is_available())
    return info


def _missing(plat: Dict, mlx: Dict, torch: Dict) -> List[Dict[str, str]]:
    out = []
    mac = plat["system"] == "Darwin"
    if mac and plat["machine"] != "arm64":
        out.append({"what": "MLX needs Apple silicon (this Mac is Intel); only the PyTorch CPU path can run",
                    "fix": _TORCH_FIX})
    if mlx["error"] or mlx["version"] is None:
        out.append({"what": "MLX is not importable" + (f" ({mlx['error']})" if mlx["error"] else ""),
                    "fix": "pip install 'mlx>=0.32.4,<0.33'" if mac else "pip install 'mlx[cpu]>=0.32.4,<0.33'"})
    elif plat["system"] == "Linux" and mlx["backend"] == "CPU" and shutil.which("nvidia-smi"):
        out.append({"what": "an NVIDIA GPU is present but MLX runs on the CPU",
                    "fix": "pip install 'vibevoice-mlx[cuda]'"})
    b = mlx.get("blas")
    if plat["system"] == "Linux" and b and not b["fast"] and b.get("fix"):
        # The mlx[cpu] wheel ships a reference BLAS (1.5 to 6 GFLOP/s here); BLIS or OpenBLAS is 10-60x faster.
        out.append({"what": f"MLX's CPU matmuls run at {b['gflops']} GFLOP/s on the {b['name']}",
                    "fix": b["fix"]})
    for module, dist, requirement in _CORE:
        if importlib.util.find_spec(module) is None:
            out.append({"what": f"{dist} is not installed", "fix": f"pip install '{requirement}'"})
    if torch["version"] is None or torch.get("error"):
        out.append({"what": "torch is not installed (needed for `say --backend torch`, parity tests and "
                            "converting pickled .bin checkpoints)",
                    "fix": ("pip install torch==2.13.0 && " if plat["system"] == "Linux" else "") + _TORCH_FIX})
    else:
        for dist in ("transformers", "diffusers"):
            if torch[dist] is None:
                out.append({"what": f"{dist} is not installed (the PyTorch path needs it)", "fix": _TORCH_FIX})
    return out


def doctor_report(memory_bytes: Optional[int] = None) -> Dict:
    """Everything `vibevoice-mlx doctor` prints, as a dict. `memory_bytes` overrides the detected memory."""
    plat = {"system": platform.system(), "release": platform.release(), "machine": platform.machine(),
            "platform": platform.platform()}
    if plat["system"] == "Darwin":
        plat["macos"] = platform.mac_ver()[0]
    memory = memory_bytes if memory_bytes is not None else system_memory_bytes()
    memory_gb = None if memory is None else memory / GB
    mlx, torch = _mlx_info(), _torch_info()
    return {
        "platform": plat,
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "mlx": mlx,
        "memory": {"bytes": memory, "gb": None if memory_gb is None else round(memory_gb, 1),
                   "kind": "unified" if plat["system"] == "Darwin" and plat["machine"] == "arm64" else "system"},
        "torch": torch,
        "recommendation": recommend(memory_gb, mlx["backend"]),
        "missing": _missing(plat, mlx, torch),
    }


def format_report(report: Dict) -> str:
    """The report as the text `vibevoice-mlx doctor` prints."""
    p, m, mem, t, r = (report[k] for k in ("platform", "mlx", "memory", "torch", "recommendation"))
    yes = {True: "yes", False: "no"}
    lines = ["Platform", f"  {p['platform']} ({p['machine']})" + (f", macOS {p['macos']}" if p.get("macos") else ""),
             "Python", f"  {report['python']['version']} ({report['python']['executable']})",
             "MLX"]
    if m["error"] or m["version"] is None:
        lines.append(f"  not available: {m['error'] or 'not installed'}")
    else:
        lines.append(f"  {m['version']}, backend: {m['backend']} (default device {m['device']})")
        if m.get("blas"):
            lines.append(f"  BLAS: {blas.describe(m['blas'])}")
            if m["blas"]["fast"] and m["blas"].get("python_command") and m["blas"]["how"] != "LD_PRELOAD":
                lines.append(f"  in Python programs: {m['blas']['python_command']}, "
                             "or vibevoice_mlx.blas.use_fast_blas() before the first import of mlx")
                lines.append("  in ComfyUI: the VibeVoice nodes load it by themselves; if ComfyUI's log says another "
                             "node pack imported MLX first, start it as "
                             f"{blas.python_command(m['blas']['system_blas'], 'main.py')}")
    lines += ["Memory", f"  {mem['gb']} GB {mem['kind']}" if mem["gb"] is not None else "  unknown", "PyTorch"]
    if t["version"] is None:
        lines.append("  not installed")
    else:
        lines.append(f"  torch {t['version']}, transformers {t['transformers'] or 'missing'}, "
                     f"diffusers {t['diffusers'] or 'missing'}; MPS available: {yes[t['mps']]}, "
                     f"CUDA available: {yes[t['cuda']]}")
    lines += ["Recommended model", f"  {r['model']}, {r['precision']}", f"  ({r['why']})", "Missing"]
    if not report["missing"]:
        lines.append("  nothing")
    for item in report["missing"]:
        lines += [f"  - {item['what']}", f"    fix: {item['fix']}"]
    return "\n".join(lines)
