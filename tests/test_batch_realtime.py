"""`vibevoice-mlx batch` with VibeVoice-Realtime-0.5B: plain-text jobs in one preset each (a name, a .pt or none),
grouped by steps and cfg scale, sidecars, resume; the options and voices that do not apply refused. On the tiny
realtime model with `--force-frames` (its stop forced through the EOS rule)."""

import json
import logging
import shutil

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

import vibevoice_mlx as vv
from vibevoice_mlx.batch import batch
from vibevoice_mlx.batch_jobs import default_seed, read_events
from vibevoice_mlx.testing import REALTIME_TINY

FRAMES = 3
TOKENIZER = str(REALTIME_TINY / "tokenizer")
JOBS = [
    {"id": "named", "script": "Hello there, how are you?", "voices": ["en-Davis_man"], "seed": 7},
    {"id": "file", "script": "A preset from a file.", "voices": ["voice.pt"], "steps": 3, "output": "sub/f.flac"},
    {"id": "default", "script": "The default voice speaks.", "cfg_scale": 1.3},
    {"id": "short", "script": "Cut me short, please, right now.", "voices": ["voice.pt"], "max_seconds": 0.27},
]


@pytest.fixture(autouse=True)
def presets(tmp_path, monkeypatch):
    """Offline, with the tiny preset dropped into the preset folder under two of the released names."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("VIBEVOICE_MLX_CACHE", str(cache))
    monkeypatch.setenv("VIBEVOICE_MLX_OFFLINE", "1")
    folder = cache / "realtime-voices"
    folder.mkdir(parents=True)
    for name in ("en-Davis_man", "en-Carter_man"):
        shutil.copy(REALTIME_TINY / "voice.pt", folder / f"{name}.pt")
    for name in ("vibevoice_mlx", None):
        monkeypatch.setattr(logging.getLogger(name), "level", logging.getLogger(name).level)


def project(root, jobs=JOBS):
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REALTIME_TINY / "voice.pt", root / "voice.pt")
    manifest = root / "jobs.jsonl"
    manifest.write_text("".join(json.dumps(j) + "\n" for j in jobs), encoding="utf-8")
    return manifest


def run(manifest, out, *args):
    return CliRunner().invoke(batch, [str(manifest), "--out-dir", str(out), "--model", str(REALTIME_TINY / "model"),
                                      "--tokenizer", TOKENIZER, "--force-frames", str(FRAMES), *map(str, args)])


def test_realtime_jobs_are_made_once_with_sidecars_and_resume(tmp_path):
    manifest, out = project(tmp_path / "p"), tmp_path / "out"
    r = run(manifest, out, "--batch-size", 2)
    assert r.exit_code == 0, r.output
    pipe = vv.load(REALTIME_TINY / "model", tokenizer=TOKENIZER)
    eos = lambda frame, probability: frame >= FRAMES - 1  # noqa: E731
    for job in JOBS:
        name = job.get("output", f"{job['id']}.wav")
        got, rate = sf.read(out / name, dtype="float32")
        voice = {"en-Davis_man": "en-Davis_man", "voice.pt": str(tmp_path / "p" / "voice.pt")}[job["voices"][0]] \
            if "voices" in job else None
        options = {k: job[k] for k in ("steps", "cfg_scale", "max_seconds") if k in job}
        want = vv.generate(pipe, job["script"], voice, seed=job.get("seed", default_seed(job["id"])), eos_rule=eos,
                           **options)
        assert rate == 24000 and len(got) == len(want.audio) == (2 if job["id"] == "short" else FRAMES) * 3200
        np.testing.assert_allclose(got, np.clip(want.audio, -1, 1), atol=2 / 32768)  # 16-bit
        side = json.loads((out / (name + ".json")).read_text())
        assert side["settings"]["family"] == "realtime"
        assert len(side["settings"]["voices"]) == len(job.get("voices", []))
        assert side["generation"] == {"steps": job.get("steps", 5), "cfg_scale": job.get("cfg_scale", 1.5)}
        assert side["result"]["truncated"] == (job["id"] == "short")
    again = run(manifest, out)
    assert again.exit_code == 0 and "4 skipped" in again.stderr
    assert sum(e["event"] == "done" for e in read_events(out)) == len(JOBS)


@pytest.mark.parametrize("job, match", [
    ({"id": "t", "script": "Hi.", "temperature": 0.5}, "temperature only apply to VibeVoice 1.5B/7B"),
    ({"id": "v", "script": "Hi.", "voices": ["voice.pt", "voice.pt"]}, "one voice per script; got 2"),
])
def test_manifest_lines_that_do_not_apply_are_refused_before_anything_runs(job, match, tmp_path):
    r = run(project(tmp_path / "p", [job]), tmp_path / "out")
    assert r.exit_code == 1 and match in r.stderr and r.stderr.count("\n") == 1, r.output
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_the_1_5b_options_are_refused(tmp_path):
    r = run(project(tmp_path / "p"), tmp_path / "out", "--top-p", 0.9)
    assert r.exit_code == 1 and "--temperature and --top-p only apply" in r.stderr


def test_an_audio_voice_fails_its_job_alone(tmp_path):
    root = tmp_path / "p"
    root.mkdir()
    sf.write(root / "me.wav", np.zeros(2400, np.float32), 24000)
    jobs = [{"id": "wav", "script": "Hi.", "voices": ["me.wav"]}, {"id": "ok", "script": "Hi.", "voices": ["voice.pt"]}]
    r = run(project(root, jobs), tmp_path / "out")
    assert r.exit_code == 1 and "cannot take a voice from audio" in r.stderr
    assert (tmp_path / "out" / "ok.wav").is_file() and not (tmp_path / "out" / "wav.wav").exists()
