"""Batched generation: each script of a batch equals that script generated alone (the batch-equals-solo test).

Rows stop early, restart segments (pauses) and restart their negative branch and tokenizer streams mid-segment
(speech_end, speech_start), while their batch-mates go on; token choices are forced per script through the
sampler hook, and the diffusion noise comes from each script's own seed.
"""

import numpy as np
import pytest

import vibevoice_mlx as vv
from vibevoice_mlx.testing import assert_close

SD, SE, SS, EOS = 259, 258, 257, 256  # speech_diffusion, speech_end, speech_start, eos in the tiny vocabulary


def scripted(*segments):
    """A sampler that plays one token list per segment (a new list after each eos or cut)."""
    plan = [list(s) for s in segments]
    state = {"seg": 0, "i": 0}

    def choose(logits, ids):
        seg = plan[min(state["seg"], len(plan) - 1)]
        token = seg[state["i"]] if state["i"] < len(seg) else SD
        state["i"] += 1
        if token == EOS:
            state["seg"], state["i"] = state["seg"] + 1, 0
        return token

    return choose


SCRIPTS = [
    "Speaker 1: Hello there, this is the first script.",
    "Speaker 1: Short. [pause:50ms] Speaker 2: And then a second part.",
    "Speaker 1: A third one speaks, stops, starts again.",
]
PLANS = [
    [[SD] * 5 + [SE, EOS]],
    [[SD] * 2 + [SE, EOS], [SD] * 3 + [SE, EOS]],  # two segments around a pause
    [[SD] * 2 + [SE, SS] + [SD] * 3 + [SE, EOS]],  # a new speech segment mid-prompt (§6.4)
]


@pytest.fixture(scope="module")
def pipe(tiny):
    return vv.load(tiny["original"], tokenizer=tiny["tokenizer"], max_batch=8)


def _voices(hop):
    rng = np.random.default_rng(11)
    return [[rng.standard_normal(3 * hop + 5).astype(np.float32)],
            [rng.standard_normal(hop + 1).astype(np.float32), rng.standard_normal(5 * hop).astype(np.float32)],
            None]


def _solo(pipe, voices, seeds):
    return [vv.generate(pipe, s, v, sampler=scripted(*p), seed=seed)
            for s, v, p, seed in zip(SCRIPTS, voices, PLANS, seeds)]


def test_each_row_equals_its_script_alone(pipe):
    voices, seeds = _voices(pipe.hop_length), [3, 4, 5]
    solo = _solo(pipe, voices, seeds)
    batch = vv.generate_batch(pipe, SCRIPTS, voices, sampler=[scripted(*p) for p in PLANS], seed=seeds)
    assert len(batch) == 3
    for i, (b, s) in enumerate(zip(batch, solo)):
        assert b.tokens == s.tokens and b.frames == s.frames == sum(p.count(SD) for p in PLANS[i])
        assert len(b.audio) == len(s.audio)
        # observed: 0 on the wheel's BLAS, which pytest runs on; BLIS rounds a row by the batch's shape unless
        # batch_invariant (tests/test_batch_invariance.py), and a GPU may round batched matmuls differently
        assert_close(f"batch row {i} vs solo", b.audio, s.audio, atol=1e-5 * max(1.0, np.abs(s.audio).max()))
    pause = int(0.05 * 24000)
    assert len(batch[1].audio) == 5 * pipe.hop_length + pause  # the pause is exact silence in row 1's audio
    assert not np.any(batch[1].audio[2 * pipe.hop_length:2 * pipe.hop_length + pause])
    assert not np.allclose(batch[0].audio[:len(batch[2].audio)], batch[2].audio[:len(batch[0].audio)])


def test_more_scripts_than_slots_queue_and_still_equal(tiny, pipe):
    small = vv.load(tiny["original"], tokenizer=tiny["tokenizer"], max_batch=2)
    voices, seeds = _voices(pipe.hop_length), [7, 8, 9]
    solo = _solo(pipe, voices, seeds)
    batch = vv.generate_batch(small, SCRIPTS, voices, sampler=[scripted(*p) for p in PLANS], seed=seeds)
    for i, (b, s) in enumerate(zip(batch, solo)):
        assert b.tokens == s.tokens
        assert_close(f"queued row {i} vs solo", b.audio, s.audio, atol=1e-5 * max(1.0, np.abs(s.audio).max()))


def test_stream_tags_responses_by_script_and_finishes_each(pipe):
    seen = {0: [], 1: [], 2: []}
    for i, r in vv.stream_generate_batch(pipe, SCRIPTS, sampler=[scripted(*p) for p in PLANS], seed=1):
        seen[i].append(r)
    for i, rs in seen.items():
        assert rs[-1].finished and sum(r.finished for r in rs) == 1, i
        assert [r.frames for r in rs if r.audio.size and not r.is_pause] == list(range(1, rs[-1].frames + 1))


def test_a_stopped_row_ends_and_the_others_go_on(pipe):
    made = {"n": 0}

    def stop_after_two():
        return made["n"] >= 2

    def counting(logits, ids):
        made["n"] += 1
        return SD

    results = vv.generate_batch(pipe, SCRIPTS[:2], sampler=[counting, scripted(*PLANS[1])],
                                stop=[stop_after_two, None], seed=0, max_seconds=[None, None])
    assert results[0].frames <= 2 and results[0].truncated
    assert [t for t in results[1].tokens if t] == PLANS[1]
    assert results[1].frames == 5


def test_per_script_max_seconds_and_options_are_checked(pipe):
    res = vv.generate_batch(pipe, SCRIPTS[:2], sampler=[scripted([SD] * 50), scripted([SD] * 50)], seed=0,
                            max_seconds=[2 * pipe.hop_length / 24000, 4 * pipe.hop_length / 24000])
    assert [r.frames for r in res] == [2, 4] and all(r.truncated for r in res)
    with pytest.raises(ValueError, match="one per script"):
        vv.generate_batch(pipe, SCRIPTS[:2], seed=[1, 2, 3])


@pytest.mark.parametrize("fails", ["audio", "sidecar"])
def test_a_full_disk_leaves_neither_the_audio_nor_its_sidecar(tmp_path, monkeypatch, fails):
    """The sidecar failed after the audio was in place: a WAV without its sidecar. Now both or neither, and the
    message names the output, not a temporary file."""
    import errno
    import os
    from pathlib import Path

    import soundfile as sf

    from vibevoice_mlx.batch_jobs import Job, write_outputs
    from vibevoice_mlx.output import DiskFullError

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(*((Path, "write_text") if fails == "sidecar" else (sf.SoundFile, "write")), full)
    job = Job("a", 1, "a.wav", 0, script="Speaker 1: hi", settings={"seed": 0})
    with pytest.raises(DiskFullError, match="No space left on device while writing .*a.wav$"):
        write_outputs(tmp_path, job, np.zeros(160, np.float32), 24000, {})
    assert list(tmp_path.iterdir()) == []


def test_model_identity_follows_the_folder_not_its_spelling(tiny, tmp_path, monkeypatch):
    import shutil

    from vibevoice_mlx.checkpoint import model_identity

    folder = shutil.copytree(tiny["original"], tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    first = model_identity("m")
    assert model_identity("./m/") == first == model_identity(str(folder)) and model_identity("org/repo") == {
        "repo": "org/repo"}
    config = folder / "config.json"
    config.write_text(config.read_text().replace("{", "{ ", 1))  # edited (or converted again)
    assert model_identity("m") != first
