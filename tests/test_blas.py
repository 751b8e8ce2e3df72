"""Which BLAS MLX runs on, and the CLI's fast-BLAS decision: detection, the plan for each case, the real paths."""

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core  # noqa: F401  (imported first, so nothing here can swap this process's BLAS)
import numpy as np
import pytest

from vibevoice_mlx import blas

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="MLX's BLAS is only replaceable on Linux")
SYSTEM_OPENBLAS = blas.find_system_blas("openblas") if sys.platform == "linux" else None
SYSTEM_BLIS = blas.find_system_blas("blis") if sys.platform == "linux" else None
needs_openblas = pytest.mark.skipif(SYSTEM_OPENBLAS is None,
                                    reason="no system OpenBLAS (apt-get install libopenblas0-pthread)")
needs_blis = pytest.mark.skipif(SYSTEM_BLIS is None, reason=f"no system BLIS (apt-get install {blas.APT_PACKAGE})")

WHEEL_BLAS = "/venv/lib/python3.11/site-packages/mlx_cpu.libs/libblas-bd8a282c.so.3.10.0"
NUMPY_BLAS = "/venv/lib/python3.11/site-packages/numpy.libs/libscipy_openblas64_-32a4b2a6.so"
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"
WHEEL_LAPACK = WHEEL_BLAS.replace("libblas-bd8a282c.so.3.10.0", "liblapack-86b2c207.so.3.10.0")
MAPS = f"""\
55d0c0a00000-55d0c0a21000 r--p 00000000 00:1f 123 /usr/bin/python3.11
7f0000000000-7f0000100000 r-xp 00000000 00:1f 456 {NUMPY_BLAS}
7f0000100000-7f0000200000 r--p 00100000 00:1f 456 {NUMPY_BLAS}
7f0000300000-7f0000400000 r-xp 00000000 00:1f 789 {WHEEL_LAPACK}
7f0000400000-7f0000500000 r-xp 00000000 00:1f 790 {WHEEL_BLAS}
7f0000500000-7f0000501000 rw-p 00000000 00:00 0
7f0000600000-7f0000700000 r-xp 00000000 00:1f 791 /usr/lib/x86_64-linux-gnu/libc.so.6
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
"""


def test_parse_maps_lists_blas_and_lapack_once_in_order():
    assert blas.parse_maps(MAPS) == [NUMPY_BLAS, WHEEL_LAPACK, WHEEL_BLAS]
    assert blas.parse_maps("") == []


@pytest.mark.parametrize("path, name", [
    (WHEEL_BLAS, "reference BLAS (bundled with mlx[cpu])"),
    (NUMPY_BLAS, "OpenBLAS (scipy-openblas, prefixed symbols)"),
    (OPENBLAS, "OpenBLAS"),
    ("/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3", "OpenBLAS"),
    ("/usr/lib/x86_64-linux-gnu/blas/libblas.so.3", "reference BLAS"),
    ("/opt/venv/lib/libmkl_rt.so.2", "MKL"),
    ("/usr/lib/x86_64-linux-gnu/libblis.so.4", "BLIS"),
])
def test_classify(path, name):
    assert blas.classify(path) == name
    assert blas.is_reference(blas.classify(path)) == name.startswith("reference")


@linux_only
def test_active_blas_is_the_global_provider_else_the_wheels_own():
    # Nothing global: libmlx calls its bundled BLAS; numpy's prefixed OpenBLAS, though mapped, is not it.
    assert blas.active_blas(maps=MAPS, provider=lambda: None) == {"name": "reference BLAS (bundled with mlx[cpu])",
                                                                  "path": WHEEL_BLAS}
    assert blas.active_blas(maps=MAPS, provider=lambda: OPENBLAS) == {"name": "OpenBLAS", "path": OPENBLAS}
    only_numpy = "\n".join(line for line in MAPS.splitlines() if "mlx_cpu" not in line)
    assert blas.active_blas(maps=only_numpy, provider=lambda: None)["name"] == "unknown"


@linux_only
def test_active_blas_of_this_process_is_what_is_mapped():
    active = blas.active_blas()
    assert active["path"] is not None and active["name"] != "unknown"
    assert active["path"] in blas.parse_maps(open("/proc/self/maps").read())


def test_find_system_openblas_takes_the_first_that_exists():
    paths = ["/a/libopenblas.so.0", "/b/libopenblas.so.0", "/c/libopenblas.so.0"]
    assert blas.find_system_openblas(paths, exists=lambda p: p != paths[0]) == paths[1]
    assert blas.find_system_openblas(paths, exists=lambda p: False) is None
    assert blas.openblas_paths("aarch64")[0] == "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0"


def test_auto_takes_a_threaded_blis_first_then_openblas():
    blis, openblas = ["/a/libblis.so.4", "/b/libblis.so.4"], ["/c/libopenblas.so.0"]

    def find(kind, present=("/b/libblis.so.4", "/c/libopenblas.so.0")):
        return blas.find_system_blas(kind, blis, openblas, exists=lambda p: p in present)

    assert find("auto") == find("blis") == "/b/libblis.so.4"
    assert find("openblas") == "/c/libopenblas.so.0"
    assert find("auto", present=("/c/libopenblas.so.0",)) == "/c/libopenblas.so.0"
    assert find("blis", present=("/c/libopenblas.so.0",)) is None
    assert find("auto", present=()) is None
    assert blas.blis_paths("aarch64")[0] == "/usr/lib/aarch64-linux-gnu/blis-pthread/libblis.so.4"


def test_blis_gets_every_core_unless_its_threads_are_set():
    lib = "/usr/lib/x86_64-linux-gnu/blis-pthread/libblis.so.4"
    assert blas.thread_env(lib, {}, cores=16) == {"BLIS_IC_NT": "16"}
    assert blas.thread_env(lib, {"BLIS_NUM_THREADS": "3"}, cores=16) == {}
    assert blas.thread_env(lib, {"BLIS_JC_NT": "2"}, cores=16) == {}
    assert blas.thread_env(lib, {"OMP_NUM_THREADS": "4"}, cores=16) == {}  # BLIS reads it too
    assert blas.thread_env(OPENBLAS, {}, cores=16) == {}  # OpenBLAS takes every core by itself
    assert blas.python_command(lib).startswith("BLIS_IC_NT=")
    assert blas.python_command(OPENBLAS) == f"LD_PRELOAD={OPENBLAS} python your_script.py"


@pytest.mark.parametrize("argv, cli", [
    (["/venv/bin/vibevoice-mlx", "say", "x"], True),
    (["/src/vibevoice_mlx/cli.py", "doctor"], True),  # python -m vibevoice_mlx.cli
    (["/venv/bin/pytest", "tests"], False),
    (["-c"], False),
    ([], False),
])
def test_is_cli(argv, cli):
    assert blas.is_cli(argv) == cli


REF = {"name": "reference BLAS (bundled with mlx[cpu])", "path": WHEEL_BLAS}
CLI = ["/venv/bin/vibevoice-mlx", "say"]


@pytest.mark.parametrize("argv, env, system, mlx_loaded, active, library, action, reason", [
    (CLI, {}, "Darwin", False, {"name": "Accelerate", "path": None}, None, "none", "Darwin"),
    (CLI, {blas.ENV: "off"}, "Linux", False, REF, OPENBLAS, "none", "off"),
    (["/venv/bin/pytest"], {}, "Linux", True, REF, OPENBLAS, "none", "host process"),
    (CLI, {}, "Linux", False, {"name": "OpenBLAS", "path": OPENBLAS}, OPENBLAS, "none", "already"),
    (CLI, {}, "Linux", True, {"name": "MKL", "path": "/opt/libmkl_rt.so.2"}, OPENBLAS, "none", "already"),
    (CLI, {}, "Linux", False, REF, None, "none", "apt-get install libblis4-pthread"),
    (CLI, {}, "Linux", False, REF, OPENBLAS, "preload", "not imported"),
    (CLI, {}, "Linux", True, REF, OPENBLAS, "reexec", "imported before"),
    (CLI, {blas.GUARD_ENV: OPENBLAS}, "Linux", True, REF, OPENBLAS, "none", "not again"),  # the loop guard
    (CLI, {blas.GUARD_ENV: OPENBLAS}, "Linux", False, REF, OPENBLAS, "preload", "not imported"),
    (CLI, {}, "Linux", True, REF, "/my libs/libopenblas.so.0", "none", "LD_PRELOAD"),
])
def test_plan(argv, env, system, mlx_loaded, active, library, action, reason):
    p = blas.plan(argv, env, system, mlx_loaded, active, library)
    assert p.action == action, p
    assert reason in p.reason
    assert (p.library == library) if action != "none" else True


@pytest.mark.parametrize("setting, want", [(None, "/found-auto"), ("auto", "/found-auto"), ("off", "/found-auto"),
                                           ("blis", "/found-blis"), ("openblas", "/found-openblas"),
                                           ("BLIS", "/found-blis"), (" OpenBLAS ", "/found-openblas"),
                                           ("/opt/libopenblas.so.0", "/opt/libopenblas.so.0")])
def test_the_setting_names_the_library(setting, want):
    env = {} if setting is None else {blas.ENV: setting}
    assert blas._wanted_library(env, lambda kind: f"/found-{kind}") == want


def test_a_reexecuted_process_takes_its_library_out_of_ld_preload():
    assert blas._without_preload(f"{OPENBLAS}:/lib/other.so", OPENBLAS) == "/lib/other.so"
    assert blas._without_preload(f"/lib/other.so {OPENBLAS}", OPENBLAS) == "/lib/other.so"
    assert blas._without_preload(OPENBLAS, OPENBLAS) == ""


@linux_only
def test_check_library_rejects_what_mlx_cannot_call():
    assert "cannot be loaded" in blas.check_library("/nonexistent/libopenblas.so.0")
    assert "no cblas_sgemm" in blas.check_library("libc.so.6")
    numpy_blas = glob.glob(os.path.join(os.path.dirname(np.__file__) + ".libs", "*openblas*.so*"))
    if numpy_blas:  # the PyPI OpenBLAS (scipy-openblas) prefixes its symbols: no use for MLX
        assert "no cblas_sgemm" in blas.check_library(numpy_blas[0])
    for system in filter(None, [SYSTEM_OPENBLAS, SYSTEM_BLIS]):
        assert blas.check_library(system) is None


@linux_only
def test_a_setting_that_names_no_library_is_refused_with_the_choices():
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", blas.GUARD_ENV)}
    out = subprocess.run([sys.executable, "-c", "from vibevoice_mlx import blas; print(blas.use_fast_blas())"],
                         env={**env, blas.ENV: "openblass"}, capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).parents[1])
    assert out.returncode == 0 and out.stdout.strip() == "None"
    assert "Not using openblass for MLX: it cannot be loaded" in out.stderr
    assert f"({blas.ENV} takes auto, blis, openblas, off or a library's path)" in out.stderr


@linux_only
def test_use_fast_blas_after_mlx_is_imported_changes_nothing(caplog):
    before = blas.active_blas()
    assert blas.use_fast_blas(SYSTEM_OPENBLAS or OPENBLAS) is None
    assert "after MLX was imported" in caplog.text
    assert blas.active_blas() == before


def test_blas_report_names_what_runs():
    r = blas.blas_report(measure=False)
    assert r["name"] != "unknown" and r["gflops"] is None
    assert r["fast"] == (not blas.is_reference(r["name"]))
    assert (r["fix"] is None) == (r["fast"] or sys.platform != "linux")
    assert r["name"].split()[0] in blas.describe(r)


# The real paths, each in a fresh interpreter that presents itself as the CLI.
SNIPPET = """
import json, os, sys
if {import_first}:
    import mlx.core
from vibevoice_mlx import blas
print("start", os.environ.get(blas.GUARD_ENV), flush=True)
p = blas.maybe_reexec_with_fast_blas(["vibevoice-mlx"])
import mlx.core as mx
a = mx.random.normal((256, 256), key=mx.random.key(1))
mx.eval(a)
r = blas.blas_report(measure=False)
print(json.dumps({{"action": p.action, "name": r["name"], "how": r["how"], "preload": os.environ.get("LD_PRELOAD"),
                  "config": r["config"], "product": (a @ a).tolist()}}))
"""


def _run(import_first: bool, **env):
    base = {k: v for k, v in os.environ.items()
            if k not in ("LD_PRELOAD", blas.ENV, blas.GUARD_ENV) + blas.BLIS_THREADS_ENV}
    out = subprocess.run([sys.executable, "-c", SNIPPET.format(import_first=import_first)], env={**base, **env},
                         capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    return [line for line in lines if line.startswith("start")], json.loads(lines[-1])


@linux_only
@pytest.mark.parametrize("kind", [pytest.param("openblas", marks=needs_openblas),
                                  pytest.param("blis", marks=needs_blis)])
def test_cli_loads_the_system_blas_in_place_or_by_reexec_and_results_agree(kind):
    library, name = (SYSTEM_OPENBLAS, "OpenBLAS") if kind == "openblas" else (SYSTEM_BLIS, "BLIS")
    starts, off = _run(False, **{blas.ENV: "off"})
    assert starts == ["start None"] and off["action"] == "none" and blas.is_reference(off["name"])

    starts, inplace = _run(False, **{blas.ENV: kind})  # MLX not imported yet: loaded in this process
    assert starts == ["start None"]
    assert (inplace["action"], inplace["name"], inplace["how"]) == ("preload", name, "loaded by vibevoice-mlx")

    starts, again = _run(True, **{blas.ENV: kind})  # MLX imported first: the command starts once more, once only
    assert starts == ["start None", f"start {library}"]
    assert (again["action"], again["name"], again["how"]) == ("none", name, "LD_PRELOAD")
    assert again["preload"] is None  # children of the re-executed process do not inherit it

    if kind == "blis":  # one thread per usable core on both paths, not BLIS's default of one
        cores = len(os.sched_getaffinity(0))
        assert inplace["config"].startswith("BLIS ") and inplace["config"].endswith(f" {cores} threads")
        assert again["config"] == inplace["config"]

    ref = np.array(off["product"], dtype=np.float32)
    scale = np.abs(ref).max()
    for fast in (inplace, again):  # another BLAS, the same product up to float32 rounding
        np.testing.assert_allclose(np.array(fast["product"], dtype=np.float32), ref, rtol=0, atol=1e-5 * scale)


@linux_only
@pytest.mark.skipif(SYSTEM_BLIS is None and SYSTEM_OPENBLAS is None, reason="no system BLAS")
def test_auto_loads_blis_when_there_is_one():
    _, auto = _run(False)
    assert auto["name"] == ("BLIS" if SYSTEM_BLIS else "OpenBLAS")
