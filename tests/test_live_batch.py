"""Continuous batching: a script that joins a running batch, or stays while others join and leave, makes the audio
of its solo run bit for bit (`batch_invariant=True`), in the library (`generation.LiveBatch`) and in the server's
worker; and the same join under BLIS, in a fresh interpreter that loads it as the command does.

Token choices are forced per script through the sampler hook (the tiny random model rarely speaks by itself);
each script's noise comes from its own seed.
"""

import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import vibevoice_mlx as vv
from vibevoice_mlx.testing import run_under_blas, system_blas
from vibevoice_mlx.errors import UserError
from vibevoice_mlx.generation import LiveBatch
from vibevoice_mlx.server.cli import force_frames
from vibevoice_mlx.server.worker import Job, Worker

from test_batch import EOS, PLANS, SCRIPTS, SD, SE, scripted

# (script, sampler plan, seed, voice clip lengths in hops): A speaks 5 frames in 7 steps; B has two segments
# around a pause, and two voices; C restarts its speech mid-segment.
A = (SCRIPTS[0], [[SD] * 5 + [SE, EOS]], 3, [3.1])
B = (SCRIPTS[1], PLANS[1], 4, [1.2, 2])
C = (SCRIPTS[2], PLANS[2], 5, [])
A_STEPS = len(A[1][0])


def voices(spec, hop):
    rng = np.random.default_rng(len(spec) + 11)
    return [rng.standard_normal(int(n * hop)).astype(np.float32) for n in spec] or None


def solo(pipe, spec) -> np.ndarray:
    script, plan, seed, clips = spec
    return vv.generate(pipe, script, voices(clips, pipe.hop_length), sampler=scripted(*plan), seed=seed).audio


def joined(pipe, first, later, k):
    """`first` alone; `later` added after the k-th step of `first` -> (audio of each, batch mates B saw)."""
    live = LiveBatch(pipe)

    def add(spec):
        script, plan, seed, clips = spec
        return live.add(script, voices(clips, pipe.hop_length), sampler=scripted(*plan), seed=seed)

    names = {add(first): 0}
    if k == 0:
        names[add(later)] = 1
    audio, steps = [[], []], 0
    for handle, r in live:
        audio[names[handle]].append(r.audio)
        if names[handle] == 0 and r.token is not None:
            steps += 1
            if steps == k:
                names[add(later)] = 1
    return [np.concatenate(a) for a in audio]


@pytest.fixture(scope="module")
def pipe(tiny):
    return vv.load(tiny["original"], tokenizer=tiny["tokenizer"], batch_invariant=True)


@pytest.fixture(scope="module")
def solos(pipe):
    return {name: solo(pipe, spec) for name, spec in zip("ABC", (A, B, C))}


@pytest.mark.parametrize("k", range(A_STEPS + 1))
def test_a_script_that_joins_after_any_step_equals_its_solo_run(pipe, solos, k):
    a, b = joined(pipe, A, B, k)
    assert np.array_equal(a, solos["A"]) and np.array_equal(b, solos["B"])


def test_a_script_added_after_the_batch_ended_starts_a_new_run(pipe, solos):
    live = LiveBatch(pipe)
    hop = pipe.hop_length
    out = {}
    for spec in (A, C):  # C is added once A's run is over, and the same batch runs again
        script, plan, seed, clips = spec
        handle = live.add(script, voices(clips, hop), sampler=scripted(*plan), seed=seed)
        out[spec[2]] = np.concatenate([r.audio for h, r in live if h is handle])
        assert handle.done and handle.index == len(out) - 1
    assert np.array_equal(out[A[2]], solos["A"]) and np.array_equal(out[C[2]], solos["C"])


def test_a_cancelled_script_leaves_and_the_others_go_on(pipe, solos):
    live = LiveBatch(pipe)
    hop = pipe.hop_length
    handles = [live.add(s, voices(v, hop), sampler=scripted(*p), seed=seed) for s, p, seed, v in (A, B)]
    audio, last, frames = {h: [] for h in handles}, {}, 0
    for handle, r in live:
        audio[handle].append(r.audio)
        last[handle] = r
        frames += handle is handles[0] and r.audio.size > 0
        if frames == 2 and not handles[0].cancelled:
            handles[0].cancel()
    a, b = (np.concatenate(audio[h]) for h in handles)
    assert np.array_equal(b, solos["B"])
    assert len(a) == 2 * hop and np.array_equal(a, solos["A"][:2 * hop])  # what it made before it left
    assert last[handles[0]].finished and last[handles[0]].truncated and handles[0].done


def test_scripts_beyond_the_backend_batch_wait_and_equal_their_solo_runs(pipe, solos, monkeypatch):
    monkeypatch.setattr(pipe.backend, "max_batch", 2)
    live = LiveBatch(pipe)
    hop = pipe.hop_length
    handles = [live.add(s, voices(v, hop), sampler=scripted(*p), seed=seed) for s, p, seed, v in (A, B, C)]
    audio, together = {h: [] for h in handles}, 0
    started = set()
    for handle, r in live:
        audio[handle].append(r.audio)
        started.add(handle)
        running = sum(1 for h in started if not h.done)
        together = max(together, running)
    assert together == 2
    for handle, name in zip(handles, "ABC"):
        assert np.array_equal(np.concatenate(audio[handle]), solos[name]), name


def test_shared_options_go_to_the_batch_not_to_a_script(pipe):
    live = LiveBatch(pipe, steps=3)
    with pytest.raises(UserError, match="steps is shared by a live batch"):
        live.add(A[0], steps=5)
    with pytest.raises(UserError, match="Unknown keyword 'stepz'"):
        live.add(A[0], stepz=5)


# --- through the server's worker ----------------------------------------------------------------------------


FRAMES = {"A": 6, "B": 3, "C": 4, "D": 5}
SEEDS = {"A": 21, "B": 22, "C": 23, "D": 24}
TEXT = {"A": "Speaker 1: The first request.", "B": "Speaker 1: A second one, later.",
        "C": "Speaker 1: Third, it must queue.", "D": "Speaker 1: Fourth, and its client leaves."}


def max_seconds(name, hop):
    return FRAMES[name] * hop / 24000


class Sink:
    def __init__(self, on_audio=None):
        self.chunks, self.end, self.ended, self.on_audio = [], None, threading.Event(), on_audio

    def __call__(self, kind, payload):
        if kind == "audio":
            self.chunks.append(payload)
            if self.on_audio:
                self.on_audio(len(self.chunks))
        else:
            self.end = (kind, payload)
            self.ended.set()


def test_worker_jobs_join_at_their_next_step_queue_past_max_batch_and_equal_solo_runs(pipe):
    """B joins A's batch after A's 2nd frame and D after its 1st; with max_batch 3, C (submitted with D) queues
    until a slot frees, then joins the same batch; D's client leaves after 2 frames. Every job that finished
    equals its solo run, and all ran in one batch."""
    hop = pipe.hop_length
    worker = Worker(lambda: pipe, max_batch=3, sampler=force_frames, batch_window=0, free_when_idle=False).start()
    jobs, sinks = {}, {}

    def submit(*names):
        for name in names:
            worker.submit(jobs[name])

    def leave(n):
        if n == 2:
            worker.cancel(jobs["D"])

    triggers = {"A": lambda n: submit("B") if n == 2 else submit("D", "C") if n == 3 else None, "D": leave}
    for name in "ABCD":
        sinks[name] = Sink(triggers.get(name))
        jobs[name] = Job(TEXT[name], sinks[name], seed=SEEDS[name], max_seconds=max_seconds(name, hop))
    try:
        submit("A")
        assert all(s.ended.wait(120) for s in sinks.values())
        counts = worker.snapshot()
    finally:
        worker.stop()
    assert counts["batches"] == 1 and counts["cancelled"] == 1 and counts["completed"] == 3
    for name in "ABC":
        want = vv.generate(pipe, TEXT[name], sampler=force_frames, seed=SEEDS[name],
                           max_seconds=max_seconds(name, hop)).audio
        assert sinks[name].end[0] == "end" and np.array_equal(np.concatenate(sinks[name].chunks), want), name
    assert sinks["D"].end[1]["stopped"] and len(sinks["D"].chunks) == 2
    assert jobs["C"].started > jobs["D"].started  # C waited for a slot


# --- under BLIS, loaded as the command loads it --------------------------------------------------------------

CHILD = """
import json, sys
from vibevoice_mlx import blas
blas.use_fast_blas({library!r})
import numpy as np
import vibevoice_mlx as vv
from vibevoice_mlx.testing import COMMITTED_TINY, tiny_checkpoint
sys.path.insert(0, {tests!r})
from test_live_batch import A, A_STEPS, B, joined, solo
tiny = tiny_checkpoint(committed=COMMITTED_TINY)
pipe = vv.load(tiny["original"], tokenizer=tiny["tokenizer"], batch_invariant=True)
want = [solo(pipe, A), solo(pipe, B)]
same = [[bool(np.array_equal(g, w)) for g, w in zip(joined(pipe, A, B, k), want)] for k in range(A_STEPS + 1)]
print(json.dumps({{"blas": blas.active_blas()["name"], "same": same}}))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="MLX's BLAS is only replaceable on Linux")
def test_joins_equal_solo_runs_under_blis():
    library, _ = system_blas("blis")
    got = run_under_blas(CHILD.format(library=library, tests=str(Path(__file__).parent)), library)
    assert got["blas"] == "BLIS" and got["same"] == [[True, True]] * (A_STEPS + 1)


def test_serve_loads_batch_invariant_unless_told_otherwise():
    from click.testing import CliRunner

    from vibevoice_mlx.server.cli import serve

    option = next(p for p in serve.params if p.name == "batch_invariant")
    assert option.default is True and option.secondary_opts == ["--no-batch-invariant"]
    assert "--no-batch-invariant" in CliRunner().invoke(serve, ["--help"]).output
