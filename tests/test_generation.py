"""The generation loop and API on the tiny model (pure MLX; parity with PyTorch is in parity_tests/)."""

import logging

import numpy as np
import pytest

import vibevoice_mlx as vv


@pytest.fixture(scope="module")
def pipe(tiny):
    return vv.load(tiny["original"], tokenizer=tiny["tokenizer"])


def frames_then_stop(n):
    seq = iter([259] * n + [258, 256])
    return lambda logits, ids: next(seq)


def test_frames_audio_and_figures(pipe):
    r = vv.generate(pipe, "Speaker 1: Hello.", sampler=frames_then_stop(4), seed=0)
    assert r.frames == 4 and r.audio.dtype == np.float32 and r.audio.shape == (4 * pipe.hop_length,)
    assert r.sample_rate == 24000 and r.tokens == [[259] * 4 + [258, 256]]
    assert r.real_time_factor > 0 and r.elapsed > 0 and not r.truncated


def test_stream_yields_each_frame_as_made(pipe):
    chunks = list(vv.stream_generate(pipe, "Speaker 1: Hello.", sampler=frames_then_stop(3), seed=0))
    audio = [c for c in chunks if c.audio.size]
    assert [c.frames for c in audio] == [1, 2, 3]
    assert all(c.audio.shape == (pipe.hop_length,) for c in audio)
    assert chunks[-1].finished and not chunks[-1].truncated


def test_seed_makes_runs_reproducible_and_matters(pipe):
    kw = dict(sampler=None, voices=[np.random.default_rng(0).standard_normal(64).astype(np.float32)],
              temperature=1.0, top_p=0.9, max_seconds=8 * 16 / 24000)
    a = vv.generate(pipe, "Speaker 1: Hi.", seed=3, **kw)
    b = vv.generate(pipe, "Speaker 1: Hi.", seed=3, **kw)
    c = vv.generate(pipe, "Speaker 1: Hi.", seed=4, **kw)
    assert a.tokens == b.tokens and np.array_equal(a.audio, b.audio)
    assert a.tokens != c.tokens or not np.array_equal(a.audio, c.audio)


def test_a_drawn_seed_is_reported_and_makes_the_run_again(pipe):
    kw = dict(voices=[np.random.default_rng(0).standard_normal(64).astype(np.float32)], temperature=1.0,
              top_p=0.9, max_seconds=8 * 16 / 24000)
    a = vv.generate(pipe, "Speaker 1: Hi.", **kw)
    assert isinstance(a.seed, int)
    b = vv.generate(pipe, "Speaker 1: Hi.", seed=a.seed, **kw)
    assert b.seed == a.seed and a.tokens == b.tokens and np.array_equal(a.audio, b.audio)
    assert all(r.seed == a.seed for r in vv.stream_generate(pipe, "Speaker 1: Hi.", seed=a.seed, **kw))


def test_tokens_are_control_tokens_only(pipe):
    r = vv.generate(pipe, "Speaker 1: Hi there.", seed=1, temperature=1.5, max_seconds=0.01)
    assert r.tokens and set(sum(r.tokens, [])) <= set(pipe.tokens.control_ids)


def test_sampler_outside_control_tokens_is_an_error(pipe):
    with pytest.raises(ValueError, match="not one of the control tokens"):
        vv.generate(pipe, "Speaker 1: Hi.", sampler=lambda logits, ids: 5)


def test_prompt_longer_than_context_is_a_clear_error(pipe):
    long_voice = np.random.default_rng(0).standard_normal(16 * 5000).astype(np.float32)  # 5000 frames > 4096
    with pytest.raises(ValueError, match="context"):
        vv.generate(pipe, "Speaker 1: Hi.", voices=[long_voice])


def test_length_rule_truncates_with_a_warning(pipe, caplog):
    """The original's rule: at most 2x the prompt length in steps (§6.6), and the user is told."""
    from vibevoice_mlx.processor import build_prompt

    always = lambda logits, ids: 259  # noqa: E731
    with caplog.at_level(logging.WARNING):
        r = vv.generate(pipe, "Speaker 1: Hi.", sampler=always)
    prompt_len = len(build_prompt(pipe.tokenizer, [(0, " Hi.")], [], pipe.tokens, num_speakers=1).input_ids)
    assert r.truncated and any("cut short" in m for m in caplog.messages)
    assert r.frames == 2 * prompt_len


def test_injected_noise_too_short_is_an_error(pipe):
    with pytest.raises(ValueError, match="noise"):
        vv.generate(pipe, "Speaker 1: Hi.", sampler=frames_then_stop(3), noise=np.zeros((2, 8), np.float32))


def test_no_voice_is_allowed_and_said(pipe, caplog):
    with caplog.at_level(logging.WARNING):
        r = vv.generate(pipe, "Speaker 1: Hi.", sampler=frames_then_stop(2))
    assert r.frames == 2 and any("No voice" in m for m in caplog.messages)


def test_free_memory_after_generate(pipe, monkeypatch):
    from vibevoice_mlx import memory

    calls = []
    monkeypatch.setattr(memory, "free_memory", lambda: calls.append(1) or ["mlx"])
    vv.generate(pipe, "Speaker 1: Hi.", sampler=frames_then_stop(1))
    assert calls == []
    vv.generate(pipe, "Speaker 1: Hi.", sampler=frames_then_stop(1), free_memory_after_generate=True)
    assert calls == [1]


def test_more_than_four_speakers_warns_once(pipe, caplog):
    script = "\n".join(f"Speaker {i}: Hi." for i in range(1, 6))
    with caplog.at_level(logging.WARNING):
        vv.generate(pipe, script, sampler=frames_then_stop(1))
    assert sum("up to 4" in m for m in caplog.messages) == 1


def test_compiled_frames_equal_eager_frames(pipe):
    voices = [np.random.default_rng(5).standard_normal(80).astype(np.float32)]
    runs = {}
    for compiled in (True, False):
        runs[compiled] = vv.generate(pipe, "Speaker 1: Hello there.", voices=voices, seed=2, compile=compiled,
                                     sampler=frames_then_stop(6))
    assert runs[True].frames == runs[False].frames == 6
    np.testing.assert_allclose(runs[True].audio, runs[False].audio, atol=1e-5 * np.abs(runs[False].audio).max())


def test_voice_noise_is_the_seeded_sigma_vae_sampling(pipe):
    """On by default as in the original (§3.3.5): it changes the output, and the seed fixes it."""
    voice = [np.random.default_rng(8).standard_normal(64).astype(np.float32)]
    run = lambda **k: vv.generate(pipe, "Speaker 1: Hi.", voices=voice, sampler=frames_then_stop(3), seed=5, **k)  # noqa: E731
    a, b, off = run(), run(), run(voice_noise=False)
    np.testing.assert_array_equal(a.audio, b.audio)
    assert not np.allclose(a.audio, off.audio)


@pytest.mark.parametrize("where", ["model.language_model.norm.weight",
                                   "model.acoustic_tokenizer.decoder.head.conv.conv.bias"])
def test_overflow_is_a_clear_error_not_garbage_audio(tiny, where):
    import mlx.core as mx

    from vibevoice_mlx.errors import NumericsError

    pipe = vv.load(tiny["original"], tokenizer=tiny["tokenizer"])
    params = dict(__import__("mlx.utils", fromlist=["tree_flatten"]).tree_flatten(pipe.model.parameters()))
    pipe.model.load_weights([(where, mx.full(params[where].shape, float("inf"), params[where].dtype))],
                            strict=False)
    # float32 cannot overflow here: the message names the weights, not a float16 overflow (issue 9)
    with pytest.raises(NumericsError, match="weights hold inf/NaN"):
        vv.generate(pipe, "Speaker 1: Hi.", sampler=frames_then_stop(2), compile=False)


def test_length_rule_cuts_one_part_and_the_next_part_still_runs(pipe, caplog):
    """The length rule is per prompt: a part that never stops is cut, and the script goes on after it."""
    never_stops = lambda logits, ids: ids[0]  # speech_start forever: no frame, no eos  # noqa: E731
    with caplog.at_level(logging.WARNING):
        r = vv.generate(pipe, "Speaker 1: Hi. [pause:100ms] Speaker 1: Bye.", sampler=never_stops)
    assert r.truncated and r.tokens[0] and r.tokens[2]  # both parts ran (index 1 is the pause)
    assert any("part 1" in m for m in caplog.messages) and any("part 3" in m for m in caplog.messages)
    assert len(r.audio) == 2400  # no frame in either part; the 100 ms pause is still there


def test_extra_voices_are_reported_and_not_used(pipe, caplog):
    voices = [np.random.default_rng(i).standard_normal(48).astype(np.float32) for i in range(3)]
    with caplog.at_level(logging.WARNING):
        a = vv.generate(pipe, "Speaker 1: Hi.", voices=voices, sampler=frames_then_stop(2), seed=1)
    b = vv.generate(pipe, "Speaker 1: Hi.", voices=voices[:1], sampler=frames_then_stop(2), seed=1)
    assert any("3 voices for 1 speaker" in m for m in caplog.messages)
    np.testing.assert_array_equal(a.audio, b.audio)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_queueing_the_next_lm_step_ahead_changes_no_sample(tiny, dtype):
    """The engine queues the next LM step behind a frame on a GPU (`queue_ahead`) and not on the CPU, where
    async_eval of a big graph blocks; both orders run the same ops, so a batch whose rows end at different steps
    gives the same audio bit for bit either way."""
    import mlx.core as mx

    pipe = vv.load(tiny["original"], tokenizer=tiny["tokenizer"], dtype=dtype)
    assert pipe.backend.queue_ahead == (mx.default_device() != mx.cpu)
    scripts = ["Speaker 1: Hello there.", "Speaker 1: Hi."]
    out = {}
    for ahead in (False, True):
        pipe.backend.queue_ahead = ahead
        out[ahead] = vv.generate_batch(pipe, scripts, sampler=[frames_then_stop(5), frames_then_stop(2)], seed=4)
    for a, b in zip(out[False], out[True]):
        assert a.frames == b.frames and a.frames in (5, 2)
        np.testing.assert_array_equal(a.audio, b.audio)


@pytest.mark.parametrize("queue_ahead", [False, True])
def test_a_float16_overflow_is_recomputed_in_float32_and_the_run_goes_on(tiny, caplog, queue_ahead):
    """Per-frame numerical recovery: the decoder's output overflows float16 (weights scaled so its activations
    pass 65504, finite in float32); that frame is redone with the frame stages in float32, with one log line.
    With the next LM step queued ahead (the GPU's order), the recovery also drops that step's cache entry."""
    import mlx.core as mx

    pipe = vv.load(tiny["original"], tokenizer=tiny["tokenizer"], dtype="float16")
    pipe.backend.queue_ahead = queue_ahead
    head = pipe.model.model.acoustic_tokenizer.decoder.head.conv.conv
    head.weight = head.weight * 3e4
    head.bias = head.bias * 3e4
    assert bool(mx.all(mx.isfinite(head.weight)))  # the weights themselves still fit float16
    with caplog.at_level(logging.WARNING):
        r = vv.generate(pipe, "Speaker 1: Hi.", sampler=frames_then_stop(3), seed=0)
    assert r.frames == 3 and np.isfinite(r.audio).all() and np.abs(r.audio).max() > 65504
    notes = [m for m in caplog.messages if "recomputed it with the frame stages in float32" in m]
    assert len(notes) == 1 and "frame 1" in notes[0]


@pytest.mark.parametrize("call, message", [
    (lambda p: vv.generate(p, None), "script 1 must be text (str), not NoneType"),
    (lambda p: vv.generate(p, b"Speaker 1: Hi."), "not bytes (decode it first"),
    (lambda p: vv.generate(p, "Speaker 1: Hi.", colour=3), "Unknown keyword 'colour'"),
    (lambda p: vv.stream_generate(p, "Speaker 1: Hi.", stepz=3), "Unknown keyword 'stepz'"),  # at the call
    (lambda p: vv.generate(p, "Speaker 1: Hi.", voices=3), "voices of script 1: give a list"),
    (lambda p: vv.generate_batch(p, "Speaker 1: Hi."), "scripts must be a list"),
    (lambda p: vv.generate_batch(p, ["Speaker 1: Hi."], voices="a.wav"), "one list (or None) per script"),
    (lambda p: vv.generate("model-folder", "Speaker 1: Hi."), "what vibevoice_mlx.load() returns"),
])
def test_api_misuse_is_one_user_error(pipe, call, message):
    from vibevoice_mlx.errors import UserError

    with pytest.raises(UserError) as e:
        call(pipe)
    assert message in str(e.value), e.value


def test_a_single_voice_path_is_a_one_voice_list(pipe, tmp_path):
    import soundfile as sf

    path = tmp_path / "alice.wav"
    sf.write(path, 0.2 * np.random.default_rng(0).standard_normal(24000).astype(np.float32), 24000)
    one = vv.generate(pipe, "Speaker 1: Hi.", voices=str(path), sampler=frames_then_stop(2), seed=1)
    listed = vv.generate(pipe, "Speaker 1: Hi.", voices=[str(path)], sampler=frames_then_stop(2), seed=1)
    assert one.frames == 2 and np.array_equal(one.audio, listed.audio)


@pytest.mark.parametrize("kwargs, message", [({"max_batch": 0}, "max_batch must be a whole number from 1"),
                                             ({"max_batch": 2.5}, "max_batch"),
                                             ({"dtype": "int8"}, "dtype 'int8' is not one of"),
                                             ({"backend": "jax"}, "Unknown backend")])
def test_load_arguments_are_checked_before_reading_anything(tmp_path, kwargs, message):
    from vibevoice_mlx.errors import UserError

    with pytest.raises(UserError, match=message):
        vv.load(tmp_path / "not-read", **kwargs)  # the folder does not exist: the argument is refused first
