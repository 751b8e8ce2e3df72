"""`mlx.launch -n 2 vibevoice-mlx batch ...`: two local processes on the ring backend take every other job by their
`mx.distributed` rank, with no collectives, and together make each job exactly once."""

import socket
import subprocess
import sys

from test_batch_cli import FRAMES, JOBS, assert_same_audio, audio_of, check_exactly_once, model, reference  # noqa: F401
from test_batch_cli import ENV, write_project

LAUNCH = "from mlx._distributed_utils.launch import main; main()"  # what the mlx.launch script runs


def free_ports(n: int) -> int:
    """A first port such that it and the next n - 1 are free on 127.0.0.1 (the ring backend takes one per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = s.getsockname()[1]
        try:
            held = []
            for p in range(first, first + n):
                sock = socket.socket()
                held.append(sock)
                sock.bind(("127.0.0.1", p))
            return first
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise RuntimeError("no free ports")


def test_mlx_launch_shards_by_rank(reference, model, tmp_path):  # noqa: F811
    jobs = [j for j in JOBS if "steps" not in j and "max_seconds" not in j]  # one compiled step for all: quicker
    manifest = write_project(tmp_path, jobs)
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", LAUNCH, "-n", "2", "--starting-port", str(free_ports(2)), "--",
           sys.executable, "-m", "vibevoice_mlx.cli", "batch", str(manifest), "--out-dir", str(out), "--model",
           str(model), "--force-frames", str(FRAMES), "--batch-size", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=ENV)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log
    for rank in (0, 1):
        assert f"rank {rank}/2 2 of 4 jobs" in log and f"rank {rank}/2 2 done, 0 skipped, 0 failed" in log, log
    events = check_exactly_once(out, jobs)
    pid = {e["id"]: e["pid"] for e in events if e["event"] == "done"}
    by_rank = [{pid[j["id"]] for j in jobs[r::2]} for r in (0, 1)]
    assert all(len(p) == 1 for p in by_rank) and by_rank[0] != by_rank[1]  # one process per rank, its own jobs
    assert_same_audio(audio_of(out, jobs), {j["id"]: reference[1][j["id"]] for j in jobs})
