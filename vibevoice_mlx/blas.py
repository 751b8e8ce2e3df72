"""Which BLAS MLX's CPU backend runs on, and a fast one for it on Linux.

The mlx[cpu] wheel links a reference BLAS of its own (`mlx_cpu.libs/libblas-<hash>.so.3`, found through an
RPATH, so the system's `libblas.so.3` alternatives never reach it): 1.5 to 6 GFLOP/s for a float32 matmul.
libmlx looks `cblas_sgemm` and the LAPACK routines up in the process's global scope first, so a BLAS placed
there before `import mlx.core` (LD_PRELOAD, or dlopen with RTLD_GLOBAL) runs every float32 matmul instead,
10 to 60 times faster. The OpenBLAS wheels on PyPI (scipy-openblas32/64, numpy's copy) prefix their symbols
(`scipy_cblas_sgemm`), so they cannot stand in: the library has to come from the system.

Two system libraries serve: BLIS (threaded build) and OpenBLAS. `auto` takes BLIS first: a frame's matmuls have
2 to 8 rows (the CFG pair, a batch), where BLIS's skinny-matrix kernels ran a 1.5B frame 1.45x to 1.55x faster
than OpenBLAS 0.3.21 on the test machine; OpenBLAS is 7 to 15 % faster on the prefill's prompt-sized products,
which a generation runs once. BLIS runs one thread unless told, so when no BLIS or OpenMP thread setting is in the
environment the library gets all usable cores on its IC loop (`BLIS_IC_NT`; see `thread_env`). Serial BLIS builds
are passed over.

    VIBEVOICE_MLX_BLAS=auto (default) | blis | openblas | off | /path/to/libblas.so

The `vibevoice-mlx` command loads the library by itself (`maybe_reexec_with_fast_blas`); a Python program
calls `use_fast_blas()` before its first `import mlx`, or runs under `LD_PRELOAD=<library>`.
"""

import ctypes
import logging
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence

logger = logging.getLogger(__name__)

ENV = "VIBEVOICE_MLX_BLAS"
# Set in a re-executed process (to the library it preloads): a process that has it never re-executes again.
GUARD_ENV = "VIBEVOICE_MLX_BLAS_REEXEC"
APT_PACKAGE = "libblis4-pthread"  # Debian, Ubuntu; libopenblas0-pthread serves too
BLIS_THREADS_ENV = ("BLIS_NUM_THREADS", "OMP_NUM_THREADS", "BLIS_JC_NT", "BLIS_PC_NT", "BLIS_IC_NT", "BLIS_JR_NT",
                    "BLIS_IR_NT")
# Only for a BLAS that cannot be named: here the reference one ran at 1.5 to 6 GFLOP/s, OpenBLAS at 16 to 320.
SLOW_BLAS_GFLOPS = 20.0


def openblas_paths(machine: Optional[str] = None) -> List[str]:
    """Where the common distributions put a 32-bit-integer (LP64) OpenBLAS, the threaded build first."""
    multiarch = f"/usr/lib/{machine or platform.machine()}-linux-gnu"
    return [
        f"{multiarch}/openblas-pthread/libopenblas.so.0",  # Debian, Ubuntu: libopenblas0-pthread
        f"{multiarch}/libopenblas.so.0",  # Debian, Ubuntu: the alternative (pthread, openmp or serial build)
        "/usr/lib64/libopenblasp.so.0",  # Fedora, RHEL: openblas-threads
        "/usr/lib64/libopenblas.so.0",  # Fedora, openSUSE
        "/usr/lib/libopenblas.so.0",  # Arch
    ]


def blis_paths(machine: Optional[str] = None) -> List[str]:
    """Where the common distributions put a threaded BLIS with the CBLAS interface. The serial builds (and the
    `libblis.so.4` alternatives, which may point to one) are left out: they run a matmul on one core."""
    multiarch = f"/usr/lib/{machine or platform.machine()}-linux-gnu"
    return [
        f"{multiarch}/blis-pthread/libblis.so.4",  # Debian, Ubuntu: libblis4-pthread
        f"{multiarch}/blis-openmp/libblis.so.4",  # Debian, Ubuntu: libblis4-openmp
        "/usr/lib64/libblisp.so.4",  # Fedora: blis-threads (pthreads)
        "/usr/lib64/libbliso.so.4",  # Fedora: blis-openmp
    ]


def classify(path: str) -> str:
    """A BLAS library's name from its path."""
    low = path.lower()
    if "scipy_openblas" in low:
        return "OpenBLAS (scipy-openblas, prefixed symbols)"  # numpy's and scipy's copy: MLX cannot use it
    if "openblas" in low:
        return "OpenBLAS"
    if "mkl" in low:
        return "MKL"
    if "blis" in low:
        return "BLIS"
    if "accelerate" in low or "veclib" in low:
        return "Accelerate"
    if "mlx_cpu.libs" in low:
        return "reference BLAS (bundled with mlx[cpu])"
    return "reference BLAS" if "/blas/" in low or "libblas" in low else os.path.basename(path)


def is_reference(name: str) -> bool:
    return name.startswith("reference BLAS")


def parse_maps(text: str) -> List[str]:
    """The BLAS and LAPACK libraries mapped into a process, from the text of its /proc/<pid>/maps, in order."""
    out = []
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 6 or not parts[5].startswith("/"):
            continue
        path = parts[5].strip()
        base = os.path.basename(path).lower()
        if any(k in base for k in ("blas", "lapack", "mkl_rt", "blis")) and path not in out:
            out.append(path)
    return out


def _read_maps(path: str = "/proc/self/maps") -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def global_cblas_provider() -> Optional[str]:
    """The library that defines `cblas_sgemm` in this process's global scope (what libmlx binds to when it is
    loaded after it), or None when only libmlx's own, local BLAS has one."""
    if sys.platform != "linux":
        return None
    try:
        fn = ctypes.CDLL(None).cblas_sgemm
    except (AttributeError, OSError):
        return None
    try:
        dladdr = ctypes.CDLL(None).dladdr
    except AttributeError:  # glibc before 2.34 keeps it in libdl
        dladdr = ctypes.CDLL("libdl.so.2").dladdr
    info = _DlInfo()
    if not dladdr(ctypes.cast(fn, ctypes.c_void_p), ctypes.byref(info)) or not info.dli_fname:
        return None
    return os.fsdecode(info.dli_fname)


def active_blas(maps: Optional[str] = None, provider: Optional[Callable[[], Optional[str]]] = None) -> Dict:
    """Which BLAS MLX's float32 matmuls run on: {'name', 'path'}; `maps` and `provider` are for tests."""
    if sys.platform == "darwin":
        return {"name": "Accelerate", "path": None}
    found = (provider or global_cblas_provider)()
    if found:
        return {"name": classify(found), "path": found}
    mapped = parse_maps(_read_maps() if maps is None else maps)
    # Mapped but prefixed (numpy's scipy_openblas) or LAPACK only: not what libmlx calls.
    own = [p for p in mapped if "lapack" not in os.path.basename(p).lower() and "scipy_openblas" not in p]
    if own:
        return {"name": classify(own[0]), "path": own[0]}
    return {"name": "unknown", "path": None}


def check_library(path: str) -> Optional[str]:
    """Why `path` cannot serve MLX's CBLAS calls, or None if it can: it must export `cblas_sgemm` with 32-bit
    integers and compute a small product exactly. It is opened locally, so this changes nothing."""
    try:
        lib = ctypes.CDLL(path, mode=os.RTLD_LOCAL)
    except OSError as err:
        return f"cannot be loaded: {err}"
    if not hasattr(lib, "cblas_sgemm"):
        return "exports no cblas_sgemm (prefixed or not a CBLAS)"
    if hasattr(lib, "openblas_get_config"):
        lib.openblas_get_config.restype = ctypes.c_char_p
        if b"USE64BITINT" in (lib.openblas_get_config() or b""):
            return "is a 64-bit-integer (ILP64) build; MLX calls the 32-bit one"
    f, i = ctypes.c_float, ctypes.c_int
    sgemm = lib.cblas_sgemm
    sgemm.restype = None
    sgemm.argtypes = [i, i, i, i, i, i, f, ctypes.c_void_p, i, ctypes.c_void_p, i, f, ctypes.c_void_p, i]
    a, b, c = (f * 6)(1, 2, 3, 4, 5, 6), (f * 6)(7, 8, 9, 10, 11, 12), (f * 4)()
    sgemm(101, 111, 111, 2, 2, 3, 1.0, a, 3, b, 2, 0.0, c, 2)  # row-major (2x3)(3x2), no transposes
    return None if list(c) == [58.0, 64.0, 139.0, 154.0] else f"computes a wrong product {list(c)}"


def find_system_openblas(paths: Optional[Sequence[str]] = None,
                         exists: Callable[[str], bool] = os.path.exists) -> Optional[str]:
    """The first OpenBLAS of `paths` (default: `openblas_paths()`) that exists on this machine."""
    return next((p for p in (openblas_paths() if paths is None else paths) if exists(p)), None)


def find_system_blas(kind: str = "auto", blis: Optional[Sequence[str]] = None,
                     openblas: Optional[Sequence[str]] = None,
                     exists: Callable[[str], bool] = os.path.exists) -> Optional[str]:
    """The system BLAS `auto` (a threaded BLIS, else OpenBLAS), `blis` or `openblas` takes, or None. Nothing is
    loaded to find it: a library mapped into the process, even locally, would show in what `active_blas` reads."""
    found_blis = next((p for p in (blis_paths() if blis is None else blis) if exists(p)), None)
    found_openblas = find_system_openblas(openblas, exists)
    return {"blis": found_blis, "openblas": found_openblas}.get(kind, found_blis or found_openblas)


SETTINGS = ("auto", "blis", "openblas", "off")  # anything else names a library


def _setting(env: Mapping[str, str]) -> str:
    value = env.get(ENV, "").strip()
    return value.lower() if value.lower() in SETTINGS else value or "auto"


def _wanted_library(env: Mapping[str, str], find: Callable[[str], Optional[str]] = find_system_blas
                    ) -> Optional[str]:
    setting = _setting(env)
    if setting in SETTINGS:
        return find("auto" if setting == "off" else setting)
    return setting


def thread_env(library: str, env: Mapping[str, str], cores: Optional[int] = None) -> Dict[str, str]:
    """What the environment needs for `library` to use every core: BLIS starts one thread unless one of
    `BLIS_THREADS_ENV` says more (OpenBLAS and MKL take all cores by themselves). It gets them all on its IC loop:
    on the test machine that split ran a frame's 2- and 8-row products faster than BLIS's own split of
    `BLIS_NUM_THREADS`, and the prefill's 232-row ones no slower."""
    if classify(library) != "BLIS" or any(env.get(k) for k in BLIS_THREADS_ENV):
        return {}
    cores = cores or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    return {"BLIS_IC_NT": str(cores or 1)}


@dataclass
class Plan:
    action: str  # "none", "preload" (load it into this process now) or "reexec" (start again under LD_PRELOAD)
    reason: str
    library: Optional[str] = None


def plan(argv: Sequence[str], env: Mapping[str, str], system: str, mlx_loaded: bool, active: Dict,
         library: Optional[str]) -> Plan:
    """What the CLI does about its BLAS. Pure: every fact about the process is an argument."""
    if system != "Linux":
        return Plan("none", f"{system}: MLX uses Accelerate or the GPU")
    if _setting(env) == "off":
        return Plan("none", f"{ENV}=off")
    if not is_cli(argv):
        return Plan("none", "not the vibevoice-mlx program: a host process keeps its libraries")
    if active.get("path") and not is_reference(active["name"]) and active["name"] != "unknown":
        return Plan("none", f"already runs on {active['name']} ({active['path']})")
    if library is None:
        return Plan("none", f"no system BLIS or OpenBLAS found (apt-get install {APT_PACKAGE})")
    if not mlx_loaded:
        return Plan("preload", "MLX is not imported yet", library)
    if env.get(GUARD_ENV):
        return Plan("none", f"re-executed once with {env[GUARD_ENV]} already; not again", library)
    if any(ch in library for ch in ": "):
        return Plan("none", f"{library!r} cannot go into LD_PRELOAD", library)
    return Plan("reexec", "MLX was imported before its BLAS could be replaced", library)


def is_cli(argv: Sequence[str]) -> bool:
    """True for the `vibevoice-mlx` console script and `python -m vibevoice_mlx.cli`, not for a host such as
    pytest or a program that calls `cli.main()`: only the program itself may swap a process's libraries."""
    if not argv:
        return False
    name = argv[0].replace(os.sep, "/")
    return os.path.basename(name) == "vibevoice-mlx" or name.endswith(("vibevoice_mlx/cli.py",
                                                                       "vibevoice_mlx/__main__.py"))


_loaded: Optional[str] = None  # what use_fast_blas put into the global scope


def use_fast_blas(library: Optional[str] = None) -> Optional[str]:
    """Load a fast BLAS (default: `VIBEVOICE_MLX_BLAS`, else the system's BLIS or OpenBLAS) into this process's
    global scope so that MLX's float32 matmuls run on it; returns its path, or None when nothing was loaded (not
    Linux, turned off, none found, unusable, or MLX already imported: then only LD_PRELOAD helps). Call it before
    `import mlx`; a BLIS is set to one thread per usable core unless its environment says otherwise."""
    global _loaded
    if sys.platform != "linux" or _setting(os.environ) == "off":
        return None
    if "mlx.core" in sys.modules:
        logger.warning("use_fast_blas() was called after MLX was imported: MLX keeps its reference BLAS. "
                       "Call it first, or run with LD_PRELOAD=%s", library or find_system_blas())
        return None
    library = library or _wanted_library(os.environ)
    if library is None:
        return None
    problem = check_library(library)
    if problem:
        named = library == _setting(os.environ)  # the user's own setting, perhaps a typo
        logger.warning("Not using %s for MLX: it %s%s", library, problem,
                       f" ({ENV} takes {', '.join(SETTINGS)} or a library's path)" if named else "")
        return None
    lib = ctypes.CDLL(library, mode=os.RTLD_GLOBAL)  # promotes the locally opened library to the global scope
    threads = thread_env(library, os.environ)
    if threads:  # BLIS read its environment when first opened (by the checks above): set the count directly
        ways = [1, 1, int(threads["BLIS_IC_NT"]), 1, 1]  # jc, pc, ic, jr, ir
        lib.bli_thread_set_ways(*map(ctypes.c_long, ways))
    _loaded = global_cblas_provider() or library  # the path as the dynamic linker names it
    logger.debug("MLX's BLAS: %s, loaded into the global scope", library)
    return library


def _without_preload(value: str, library: str) -> str:
    return ":".join(p for p in value.replace(" ", ":").split(":") if p and p != library)


def maybe_reexec_with_fast_blas(argv: Optional[Sequence[str]] = None) -> Plan:
    """Give the `vibevoice-mlx` process a fast BLAS on Linux; call it first thing in the CLI.

    Before `import mlx` this loads the OpenBLAS in place (no second process). If MLX is already imported, it
    re-executes the same command once with the library in LD_PRELOAD; `VIBEVOICE_MLX_BLAS_REEXEC` guards against
    a second time and `VIBEVOICE_MLX_BLAS=off` skips all of it. Does nothing in any other process (`argv`,
    default `sys.argv`, tells). Returns what it decided; on a re-exec it does not return.
    """
    argv = sys.argv if argv is None else argv
    env = os.environ
    if env.get(GUARD_ENV) and env.get("LD_PRELOAD"):
        # Re-executed: the library is in; children (the compiler of mx.compile, encoders) need not load it.
        rest = _without_preload(env["LD_PRELOAD"], env[GUARD_ENV])
        if rest:
            env["LD_PRELOAD"] = rest
        else:
            del env["LD_PRELOAD"]
    p = plan(argv, env, platform.system(), "mlx.core" in sys.modules, active_blas(), _wanted_library(env))
    if p.action == "preload" and use_fast_blas(p.library) is None:
        p = Plan("none", f"{p.library} could not be used (see the warning)", p.library)
    if p.action == "reexec" and (problem := check_library(p.library)):
        p = Plan("none", f"{p.library} {problem}", p.library)
    logger.debug("BLAS: %s (%s)", p.action, p.reason)
    if p.action == "reexec":
        new_env = dict(env, **thread_env(p.library, env), **{
            GUARD_ENV: p.library, "LD_PRELOAD": ":".join(filter(None, [p.library, env.get("LD_PRELOAD")]))})
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], new_env)
    return p


def matmul_gflops(n: int = 512, repeats: int = 3) -> float:
    """float32 matmul speed of MLX on the CPU: the BLAS it runs on decides generation speed there."""
    import mlx.core as mx

    a = mx.random.normal((n, n), key=mx.random.key(0))
    mx.eval(mx.matmul(a, a, stream=mx.cpu))
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(mx.matmul(a, a, stream=mx.cpu))
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def library_config(path: str) -> Optional[str]:
    """The library's own account of its build: OpenBLAS's config string, or "BLIS <version> <threads>
    threads" (both start with the name and version, which `describe` prints)."""
    try:
        lib = ctypes.CDLL(path)
        if hasattr(lib, "openblas_get_config"):
            lib.openblas_get_config.restype = ctypes.c_char_p
            return lib.openblas_get_config().decode()
        lib.bli_info_get_version_str.restype = ctypes.c_char_p
        threads = lib.bli_thread_get_num_threads()  # -1 when the work is split by loop (BLIS_IC_NT and so on)
        if threads < 1:
            threads = math.prod(getattr(lib, f"bli_thread_get_{loop}_nt")() for loop in ("jc", "pc", "ic", "jr", "ir"))
        return f"BLIS {lib.bli_info_get_version_str().decode()} {threads} threads"
    except (OSError, AttributeError):
        return None


def python_command(library: Optional[str], program: str = "your_script.py") -> str:
    """How a Python program (ComfyUI: `main.py`) gets the fast BLAS (the command `doctor` prints)."""
    library = library or blis_paths()[0]
    threads = "".join(f"{k}={v} " for k, v in thread_env(library, {}).items())
    return f"{threads}LD_PRELOAD={library} python {program}"


def blas_report(measure: bool = True) -> Dict:
    """Which BLAS MLX runs on in this process: name, path, how it got there, its config and measured GFLOP/s,
    whether it is fast, the system BLAS `auto` takes, and the fix when it is slow."""
    import mlx.core  # noqa: F401  (libmlx must be loaded for the maps to show its BLAS)

    active = active_blas()
    path = active["path"]
    preload = (os.environ.get("LD_PRELOAD", "") + ":" + os.environ.get(GUARD_ENV, "")).replace(" ", ":").split(":")
    how = ("bundled with mlx[cpu]" if path and "mlx_cpu.libs" in path else
           "loaded by vibevoice-mlx" if path and path == _loaded else
           "LD_PRELOAD" if path and (path in preload or os.path.basename(path) in preload) else None)
    gflops = round(matmul_gflops(), 1) if measure else None
    if active["name"] == "unknown":
        fast = gflops is not None and gflops >= SLOW_BLAS_GFLOPS
    else:
        fast = not is_reference(active["name"])
    system = find_system_blas() if sys.platform == "linux" else None
    report = {"name": active["name"], "path": path, "how": how, "gflops": gflops, "fast": fast,
              "config": library_config(path) if path and active["name"] in ("OpenBLAS", "BLIS") else None,
              "setting": _setting(os.environ), "system_blas": system, "fix": None}
    if sys.platform == "linux":
        report["python_command"] = python_command(system)
        if not fast:
            report["fix"] = (f"unset {ENV} (it is off)" if report["setting"] == "off" and system else
                             f"{python_command(system)} (the vibevoice-mlx command loads it by itself)" if system
                             else f"apt-get install {APT_PACKAGE}; the vibevoice-mlx command then loads it by "
                                  f"itself, a Python program runs as {python_command(None)}")
    return report


def describe(report: Optional[Dict] = None) -> str:
    """One line on the BLAS MLX runs on, for `bench` and logs."""
    r = blas_report() if report is None else report
    how = r["how"] if r["how"] and r["how"] not in r["name"] else None
    where = ", ".join(filter(None, [r["path"], how]))
    speed = f", {r['gflops']} GFLOP/s float32" if r.get("gflops") is not None else ""
    words = (r.get("config") or "").split()
    name = " ".join(words[:2]) if words else r["name"]  # "OpenBLAS 0.3.21", "BLIS 0.9.0"
    if words[:1] == ["BLIS"]:
        name += f", {words[2]} threads"  # its default is one, so the count is worth a look
    return name + (f" ({where})" if where else "") + speed
