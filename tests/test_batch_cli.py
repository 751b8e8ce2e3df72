"""`vibevoice-mlx batch` on the tiny model: the manifest's checks, exactly-once outputs, resuming, failures that
stay local, and two `--shard` processes sharing one folder.

Random weights rarely choose speech, so the runs use the command's hidden `--force-frames N` (N frames, then
speech_end and eos, per segment). Helpers here are shared with test_batch_ray.py and test_batch_launch.py.
"""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

import vibevoice_mlx as vv
from vibevoice_mlx.batch import batch, launched_rank, select
from vibevoice_mlx.batch_run import default_batch_size, forced_frames
from vibevoice_mlx.batch_jobs import EVENT_LOG, default_seed, read_events, read_manifest

FRAMES = 3
# Processes started here keep MLX's own BLAS, as this one does, so that their audio can be compared sample for sample
# (another BLAS rounds float32 differently, and random weights amplify that over the frames).
ENV = dict(os.environ, VIBEVOICE_MLX_BLAS="off")
HOP = 16  # the tiny model's samples per frame
JOBS = [
    {"id": "hello", "script": "Speaker 1: Hello there."},
    {"id": "duo", "script": "Speaker 1: Hi Bob.\nSpeaker 2: Hi Alice!", "voices": ["alice.wav", "bob.flac"],
     "seed": 7, "output": "sub/duo.flac"},
    {"id": "pause", "script": "Speaker 1: One. [pause:50ms] Two.", "steps": 5},
    {"id": "fromfile", "file": "scripts/ep.txt", "voices": ["alice.wav"], "seed": 3},
    {"id": "short", "script": "Speaker 1: Cut me short, please.", "max_seconds": 2 * HOP / 24000},
    {"id": "last", "script": "[1]: The last one.", "seed": 11, "temperature": 0.7, "top_p": 0.9},
]


def samples(job, frames=FRAMES):
    """The audio length a job gets with forced frames: `frames` per segment, pauses as silence."""
    if job["id"] == "pause":
        return 2 * frames * HOP + int(0.05 * 24000)
    if job["id"] == "short":
        return 2 * HOP
    return frames * HOP


_MADE = {}  # made once per test session, whichever of the batch test modules asks first


@pytest.fixture(scope="module")
def model(tiny, tmp_path_factory):
    """A self-contained converted tiny model (its tokenizer inside), as a user's folder would be."""
    if "model" not in _MADE:
        out = tmp_path_factory.mktemp("model") / "tiny-mlx"
        vv.convert(str(tiny["original"]), str(out), tokenizer=str(tiny["tokenizer"]))
        _MADE["model"] = out
    return _MADE["model"]


def write_project(root: Path, jobs=JOBS) -> Path:
    """Voices, a script file and the manifest under `root`; returns the manifest."""
    rng = np.random.default_rng(5)
    root.mkdir(parents=True, exist_ok=True)
    sf.write(root / "alice.wav", 0.2 * rng.standard_normal(12000).astype(np.float32), 24000)
    sf.write(root / "bob.flac", 0.2 * rng.standard_normal((9000, 2)).astype(np.float32), 16000)
    (root / "scripts").mkdir(exist_ok=True)
    (root / "scripts" / "ep.txt").write_text("Speaker 1: Read from a file.\n", encoding="utf-8")
    manifest = root / "jobs.jsonl"
    manifest.write_text("".join(json.dumps(j) + "\n" for j in jobs), encoding="utf-8")
    return manifest


def run_batch(manifest, out, model, *args):
    r = CliRunner().invoke(batch, [str(manifest), "--out-dir", str(out), "--model", str(model),
                                   "--force-frames", str(FRAMES), *map(str, args)], catch_exceptions=False)
    return r


def cli(*args):
    """The command as a user runs it, in its own process."""
    return [sys.executable, "-m", "vibevoice_mlx.cli", "batch", *map(str, args)]


def check_exactly_once(out: Path, jobs=JOBS, frames=FRAMES):
    """Each job: one output of the right length and one sidecar; its `done` event exactly once; nothing else
    left in the folder (no temporary files)."""
    events = read_events(out)
    done = Counter(e["id"] for e in events if e["event"] == "done")
    assert done == Counter(j["id"] for j in jobs), done
    expected = {EVENT_LOG}
    for j in jobs:
        name = j.get("output", f"{j['id']}.wav")
        expected |= {name, name + ".json"}
        audio, sr = sf.read(out / name, dtype="int16")
        assert sr == 24000 and len(audio) == samples(j, frames), (j["id"], len(audio))
        side = json.loads((out / (name + ".json")).read_text())
        assert side["id"] == j["id"] and side["version"] == vv.__version__
        assert side["settings"]["seed"] == j.get("seed", default_seed(j["id"]))
    found = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert found == expected, found ^ expected
    return events


def audio_of(out: Path, jobs=JOBS):
    return {j["id"]: sf.read(out / j.get("output", f"{j['id']}.wav"), dtype="int16")[0] for j in jobs}


def assert_same_audio(a, b):
    assert a.keys() == b.keys()
    for k in a:  # int16 samples; bit-identical on the CPU, one step of rounding allowed elsewhere
        np.testing.assert_allclose(a[k].astype(int), b[k].astype(int), atol=1, err_msg=k)


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    """The manifest run once, plainly: what every other way of running it must reproduce."""
    if "reference" not in _MADE:
        root = tmp_path_factory.mktemp("reference")
        manifest = write_project(root)
        r = run_batch(manifest, root / "out", model, "--batch-size", 2)
        assert r.exit_code == 0, r.output
        _MADE["reference"] = root / "out", audio_of(root / "out")
    return _MADE["reference"]


# --- the manifest ---


@pytest.mark.parametrize("line, message", [
    ("not json", "not valid JSON"),
    ('["a list"]', "must be a JSON object"),
    ('{"id": "x", "script": "Speaker 1: Hi.", "colour": "red"}', "unknown key 'colour'"),
    ('{"id": "bad id!", "script": "Speaker 1: Hi."}', "'id' must be"),
    ('{"id": "x"}', "exactly one of 'script'"),
    ('{"id": "x", "script": "Speaker 1: Hi.", "file": "a.txt"}', "exactly one of 'script'"),
    ('{"id": "x", "script": "Speaker 1: Hi.", "seed": -1}', "seed must be a whole number from 0"),
    ('{"id": "x", "script": "Speaker 1: Hi.", "steps": 0}', "steps must be a whole number from 1"),
    ('{"id": "x", "script": "Speaker 1: Hi.", "cfg_scale": NaN}', "cfg_scale must be a number from 0 to 100; got nan"),
    ('{"id": "x", "script": "Speaker 1: Hi.", "cfg_scale": -5}', "cfg_scale must be a number from 0 to 100; got -5"),
    ('{"id": "x", "script": "Speaker 1: Hi.", "seed": 18446744073709551616}',
     "seed must be a whole number from 0 to 18446744073709551615; got 18446744073709551616"),
    ('{"id": "x", "script": "Speaker 1: Hi.", "voices": "alice.wav"}', "'voices' must be a list"),
    ('{"id": "x", "script": "Speaker 1: Hi.", "output": "../x.wav"}', "must stay inside --out-dir"),
    ('{"id": "x", "script": "Speaker 1: Hi.", "output": "x.txt"}', "needs an audio extension"),
    ('{"id": "hello", "script": "Speaker 1: Again."}', "id 'hello' is already used on line 1"),
    ('{"id": "y", "script": "Speaker 1: Hi.", "output": "HELLO.wav"}', "already written by line 1"),
])
def test_a_bad_manifest_line_is_one_line_naming_it(tmp_path, line, message):
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text(json.dumps(JOBS[0]) + "\n\n" + line + "\n")
    r = CliRunner().invoke(batch, [str(manifest), "--out-dir", str(tmp_path / "out"), "--model", "unused"])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    [error] = [ln for ln in r.output.splitlines() if ln.startswith("Error:")]
    assert "jobs.jsonl line 3" in error and message in error, error
    assert not (tmp_path / "out").exists()  # nothing is made before the manifest is right


@pytest.mark.parametrize("option", [["--cfg-scale", "nan"], ["--cfg-scale", "-5"], ["--top-p", "inf"],
                                    ["--seed", str(2**64)]])
def test_a_bad_default_option_is_refused_before_anything(tmp_path, option):
    manifest = write_project(tmp_path)
    r = CliRunner().invoke(batch, [str(manifest), "--out-dir", str(tmp_path / "out"), "--model", "unused", *option])
    assert r.exit_code in (1, 2) and "Traceback" not in r.output, r.output
    [error] = [ln for ln in r.output.splitlines() if ln.startswith("Error:")]
    assert option[0] in error or option[0].lstrip("-").replace("-", "_") in error, error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["existing", "new"])
def test_a_read_only_out_dir_is_one_line(tmp_path, read_only_folder, where):
    manifest = write_project(tmp_path)
    out = read_only_folder if where == "existing" else read_only_folder / "out"
    r = CliRunner().invoke(batch, [str(manifest), "--out-dir", str(out), "--model", "unused"])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    [error] = [ln for ln in r.output.splitlines() if ln.startswith("Error:")]
    assert f"--out-dir {out}" in error and ("not writable" in error or "Cannot create" in error), error


def test_manifest_defaults_and_shards(tmp_path):
    manifest = write_project(tmp_path)
    jobs = read_manifest(manifest, {"steps": 20, "seed": None})
    assert [j.id for j in jobs] == [j["id"] for j in JOBS]
    assert jobs[0].seed == default_seed("hello") and jobs[1].seed == 7
    assert jobs[0].options == {"steps": 20} and jobs[2].options == {"steps": 5}  # the job's own value wins
    assert jobs[3].file == str(tmp_path.resolve() / "scripts" / "ep.txt") and jobs[0].output == "hello.wav"
    ids = lambda js: [j.id for j in js]  # noqa: E731
    assert ids(select(jobs, (1, 4), (0, 1))) == ["duo", "last"]
    assert ids(select(jobs, None, (1, 2))) == ["duo", "fromfile", "last"]
    assert ids(select(jobs, (0, 2), (1, 2))) == ["pause"]  # --shard (hello, pause, short), then the rank
    assert launched_rank() == (0, 1)
    r = CliRunner().invoke(batch, [str(manifest), "--out-dir", str(tmp_path / "o"), "--shard", "2/2"])
    assert r.exit_code == 1 and "0 <= i < n" in r.output


def test_batch_size_follows_memory(model):
    pipe = vv.load(model)
    assert default_batch_size(pipe, memory_bytes=64 * 2**30) == 8
    assert default_batch_size(pipe, memory_bytes=2 * 2**30 + 2**20) == 1  # nothing left beside 2 GB of headroom
    assert 1 <= default_batch_size(pipe) <= 8


# --- running ---


def test_every_job_once_equal_to_generating_it_alone(reference, model):
    out, audio = reference
    events = check_exactly_once(out)
    starts = [e["ids"] for e in events if e["event"] == "start"]
    assert max(len(s) for s in starts) == 2 and sorted(sum(starts, [])) == sorted(j["id"] for j in JOBS)
    side = json.loads((out / "sub" / "duo.flac.json").read_text())
    assert side["generation"] == {"steps": 10, "cfg_scale": 1.3} and side["result"]["frames"] == FRAMES
    assert len(side["settings"]["voices"]) == 2 and side["timings"]["batch_size"] in (1, 2)
    assert json.loads((out / "short.wav.json").read_text())["result"]["truncated"] is True
    # one job made alone through the library: the same samples
    pipe = vv.load(model)
    job = JOBS[1]
    alone = vv.generate(pipe, job["script"], [str(out.parent / v) for v in job["voices"]], seed=7,
                        sampler=forced_frames(FRAMES))
    sf.write(out.parent / "alone.flac", alone.audio, 24000, subtype="PCM_16")
    assert_same_audio({"duo": audio["duo"]}, {"duo": sf.read(out.parent / "alone.flac", dtype="int16")[0]})


def test_a_rerun_skips_finished_jobs_and_redoes_changed_ones(reference, model, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(reference[0], out)
    manifest = write_project(tmp_path)
    r = run_batch(manifest, out, model)
    assert r.exit_code == 0 and "0 done, 6 skipped, 0 failed" in r.output, r.output
    changed = [dict(j, seed=99) if j["id"] == "hello" else j for j in JOBS]
    (out / "pause.wav.json").unlink()  # a run killed between the audio and its sidecar
    r = run_batch(write_project(tmp_path, changed), out, model)
    assert r.exit_code == 0 and "2 done, 4 skipped" in r.output, r.output
    done = [e["id"] for e in read_events(out) if e["event"] == "done"]
    assert sorted(done[-2:]) == ["hello", "pause"]
    assert json.loads((out / "hello.wav.json").read_text())["settings"]["seed"] == 99
    assert_same_audio({"pause": audio_of(out)["pause"]}, {"pause": reference[1]["pause"]})


def test_a_rerun_with_the_model_spelled_another_way_skips_finished_jobs(reference, model, tmp_path, monkeypatch):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(reference[0], out)
    manifest = write_project(tmp_path)
    monkeypatch.chdir(model.parent)
    r = run_batch(manifest, out, f"./{model.name}/")  # the same folder as the absolute path the jobs were made with
    assert r.exit_code == 0 and "0 done, 6 skipped, 0 failed" in r.output, r.output


def test_a_failing_job_is_reported_and_the_rest_go_on(model, tmp_path):
    jobs = [JOBS[0],
            {"id": "novoice", "script": "Speaker 1: Hi.", "voices": ["missing.wav"]},
            {"id": "toolong", "script": "Speaker 1: " + "far too long for the tiny context " * 150},
            {"id": "nofile", "file": "scripts/missing.txt"},
            JOBS[5]]
    r = run_batch(write_project(tmp_path, jobs), tmp_path / "out", model, "--batch-size", 4)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "failed  novoice: Voice file not found" in r.output
    assert "failed  toolong: The prompt has" in r.output  # raised inside the batch: its mates were redone alone
    assert "failed  nofile: Script file not found" in r.output
    assert "2 done, 0 skipped, 3 failed" in r.output and "3 job(s) failed: novoice, nofile, toolong" in r.output
    assert sorted(p.name for p in (tmp_path / "out").glob("*.wav")) == ["hello.wav", "last.wav"]


def test_a_killed_run_resumes_without_redoing_anything(model, tmp_path):
    jobs = [{"id": f"job{i}", "script": f"Speaker 1: Number {i}."} for i in range(5)]
    manifest = write_project(tmp_path, jobs)
    out = tmp_path / "out"
    args = cli(manifest, "--out-dir", out, "--model", model, "--force-frames", 40, "--batch-size", 1)
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    try:
        deadline = time.time() + 60
        while not any(e["event"] == "done" for e in read_events(out)) and time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    first = {e["id"] for e in read_events(out) if e["event"] == "done"}
    assert 1 <= len(first) < 5
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, env=ENV)
    assert done.returncode == 0, done.stderr
    assert f"{5 - len(first)} done, {len(first)} skipped" in done.stderr
    check_exactly_once(out, jobs, frames=40)


def test_two_shards_in_two_processes_share_the_folder(reference, model, tmp_path):
    manifest = write_project(tmp_path)
    out = tmp_path / "out"
    procs = [subprocess.Popen(cli(manifest, "--out-dir", out, "--model", model, "--force-frames", FRAMES,
                                  "--shard", f"{i}/2", "--batch-size", 2), stderr=subprocess.PIPE, text=True,
                              env=ENV)
             for i in range(2)]
    logs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert "shard 0/2 3 of 6 jobs" in logs[0] and "3 done, 0 skipped, 0 failed" in logs[1]
    events = check_exactly_once(out)
    pid = {e["id"]: e["pid"] for e in events if e["event"] == "done"}
    assert {pid[j["id"]] for j in JOBS[0::2]} == {procs[0].pid} and {pid[j["id"]] for j in JOBS[1::2]} == {procs[1].pid}
    assert_same_audio(audio_of(out), reference[1])


def test_a_job_another_run_is_making_is_left_to_it(reference, model, tmp_path):
    from vibevoice_mlx.batch_jobs import claim, release

    manifest = write_project(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    held = read_manifest(manifest)[1]  # "duo", into sub/duo.flac: as another process making it would hold it
    fd = claim(out, held)
    assert fd is not None and claim(out, held) is None  # exclusive, even within one process
    try:
        r = run_batch(manifest, out, model, "--batch-size", 2)
    finally:
        release(out, held, fd)
    assert r.exit_code == 0, r.output
    assert "busy    duo -> sub/duo.flac (another run is making it)" in r.output, r.output
    assert "5 done, 0 skipped, 0 failed, 1 being made by another run" in r.output, r.output
    assert not (out / "sub" / "duo.flac").exists()
    r = run_batch(manifest, out, model)  # its claim given back (as a killed run's is): the next run makes it
    assert r.exit_code == 0 and "1 done, 5 skipped" in r.output, r.output
    check_exactly_once(out)
    assert_same_audio(audio_of(out), reference[1])


def test_two_unsharded_runs_on_one_folder_make_each_job_once(reference, model, tmp_path):
    manifest = write_project(tmp_path)
    out = tmp_path / "out"
    procs = [subprocess.Popen(cli(manifest, "--out-dir", out, "--model", model, "--force-frames", FRAMES,
                                  "--batch-size", 1), stderr=subprocess.PIPE, text=True, env=ENV)
             for _ in range(2)]
    logs = [p.communicate(timeout=180)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    check_exactly_once(out)
    assert_same_audio(audio_of(out), reference[1])


def test_a_voice_that_is_a_folder_or_a_pipe_fails_its_job_saying_what_it_is(tmp_path):
    from vibevoice_mlx.batch_jobs import prepare
    from vibevoice_mlx.errors import UserError

    os.mkfifo(tmp_path / "voice.pipe")  # never opened: a batch hashes a voice and decodes it later, two reads
    for voice, message in [(tmp_path, "is a folder, not a regular file"),
                           (tmp_path / "voice.pipe", "is a pipe, which can be read only once")]:
        [job] = read_manifest(write_project(tmp_path, [{"id": "x", "script": "Speaker 1: Hi.", "voices": [str(voice)]}]))
        with pytest.raises(UserError, match=message):
            prepare(job, {})
