"""`vibevoice-mlx batch --ray ADDRESS` on a local Ray cluster that the test starts (two CPUs, so two workers),
with the tiny model: every job is made exactly once, a worker killed in the middle of a batch is restarted and
its batch retried, losing and duplicating nothing, and a rerun finds everything finished.

The cluster listens on 127.0.0.1 only (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes Ray use the loopback address, as
it does on a Mac) and takes a token made for the test. Ray comes with the `ray` extra; without it these tests are
skipped, except in CI, where the README's test command installs it.
"""

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf

if not os.environ.get("CI"):
    pytest.importorskip("ray")

import vibevoice_mlx as vv  # noqa: E402
from vibevoice_mlx.batch_run import forced_frames  # noqa: E402
from vibevoice_mlx.batch_jobs import read_events  # noqa: E402

from test_batch_cli import ENV, check_exactly_once, cli, model, write_project  # noqa: E402,F401

FRAMES = 80  # long enough (seconds per batch) for the kill to land in the middle of one
CLUSTER = """
import sys, ray
ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20, _temp_dir=sys.argv[1])
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()  # until the test closes stdin (or dies)
ray.shutdown()
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(address, environment for its drivers) of a Ray head started for this module, stopped at its end."""
    import tempfile

    env = dict(ENV, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=secrets.token_hex(16), RAY_DISABLE_USAGE_STATS="1")
    temp = tempfile.mkdtemp(prefix="vvray-")  # short: Ray's socket paths live under it
    head = subprocess.Popen([sys.executable, "-c", CLUSTER, temp], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, text=True)
    try:
        address = head.stdout.readline().strip()
        assert address.startswith("127.0.0.1:"), (address, head.stderr.read() if head.poll() is not None else "")
        yield address, env
    finally:
        head.stdin.close()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        shutil.rmtree(temp, ignore_errors=True)


def test_jobs_run_once_and_a_killed_worker_is_retried(cluster, model, tmp_path):  # noqa: F811
    address, env = cluster
    jobs = [{"id": f"job{i}", "script": f"Speaker 1: Job number {i}.", "seed": i} for i in range(6)]
    manifest = write_project(tmp_path, jobs)
    out = tmp_path / "out"
    driver = subprocess.Popen(cli(manifest, "--out-dir", out, "--model", model, "--force-frames", FRAMES,
                                  "--batch-size", 2, "--ray", address, "--workers", 2),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline, started = time.time() + 150, None
        while started is None and time.time() < deadline and driver.poll() is None:
            started = next((e for e in read_events(out) if e["event"] == "start"), None)
            time.sleep(0.05)
        assert started is not None, driver.communicate()[1][-3000:]
        os.kill(started["pid"], signal.SIGKILL)  # a Ray worker, in the middle of its first batch
        stdout, stderr = driver.communicate(timeout=240)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert driver.returncode == 0, stderr[-3000:]
    assert "6 done, 0 skipped, 0 failed" in stderr
    assert sorted(ln.split()[1] for ln in stderr.splitlines() if ln.startswith("done ")) == sorted(
        j["id"] for j in jobs)  # each reported once, the retried ones too
    events = check_exactly_once(out, [dict(j, id=j["id"]) for j in jobs], frames=FRAMES)
    done_by = {e["id"]: e["pid"] for e in events if e["event"] == "done"}
    assert all(done_by[i] != started["pid"] for i in started["ids"])  # the killed worker finished nothing
    assert len({e["pid"] for e in events if e["event"] == "start"}) >= 3  # two workers, then a restarted one
    # the retried job's audio is what the job makes alone
    job = next(j for j in jobs if j["id"] == started["ids"][0])
    alone = vv.generate(vv.load(model), job["script"], seed=job["seed"], sampler=forced_frames(FRAMES))
    sf.write(tmp_path / "alone.wav", alone.audio, 24000, subtype="PCM_16")
    np.testing.assert_array_equal(sf.read(out / f"{job['id']}.wav", dtype="int16")[0],
                                  sf.read(tmp_path / "alone.wav", dtype="int16")[0])
    side = json.loads((out / f"{job['id']}.wav.json").read_text())
    assert side["worker"]["pid"] == done_by[job["id"]]
    # run again: everything is finished, so the cluster is not even contacted
    again = subprocess.run(driver.args, capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 0 and "0 done, 6 skipped, 0 failed" in again.stderr, again.stderr[-3000:]
    assert "Ray" not in again.stderr
