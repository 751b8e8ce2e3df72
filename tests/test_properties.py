"""Property tests (hypothesis): the script parser and the voice reader answer any input with a result or a
UserError, never another exception, and keep their rules on every input they accept."""

import math
import string

import numpy as np
import soundfile as sf
from hypothesis import HealthCheck, given, settings, strategies as st

from vibevoice_mlx.errors import UserError
from vibevoice_mlx.processor import Pause, Segment, parse_script
from vibevoice_mlx.voices import read_voice

words = st.text(alphabet=string.ascii_letters + "àéüß,.!?'-", min_size=1, max_size=12)
sentences = st.lists(words, min_size=1, max_size=6).map(" ".join)
turns = st.lists(st.tuples(st.integers(0, 5), sentences), min_size=1, max_size=6)


@given(turns, st.booleans())
def test_labelled_turns_keep_speakers_text_and_the_shift_rule(script_turns, bracket):
    lines = [(f"[{s}]: {t}" if bracket else f"Speaker {s}: {t}") for s, t in script_turns]
    items = parse_script("\n".join(lines))
    got = [line for it in items for line in it.lines]
    shift = 1 if min(s for s, _ in script_turns) > 0 else 0
    assert got == [(s - shift, " " + t.strip()) for s, t in script_turns]


@given(turns, st.lists(st.floats(0.01, 60, allow_nan=False), min_size=1, max_size=3))
def test_pauses_split_segments_and_keep_their_length(script_turns, pauses):
    body = [f"Speaker {s}: {t}" for s, t in script_turns]
    for i, seconds in enumerate(pauses):
        body.insert(min(len(body), i + 1), f"[pause:{seconds:.3f}s]")
    items = parse_script("\n".join(body))
    assert [round(p.seconds, 3) for p in items if isinstance(p, Pause)] == [round(p, 3) for p in pauses]
    assert all(it.lines for it in items if isinstance(it, Segment))


@given(st.text(max_size=200))
@settings(max_examples=300)
def test_any_text_is_a_script_or_a_user_error(text):
    try:
        items = parse_script(text)
    except UserError:
        return
    assert items and any(isinstance(it, Segment) for it in items)
    for it in items:
        if isinstance(it, Segment):
            assert all(isinstance(s, int) and s >= 0 and t.startswith(" ") and t.strip() for s, t in it.lines)


@given(st.lists(st.one_of(st.floats(-10, 10, width=32), st.sampled_from([np.nan, np.inf, -np.inf, 0.0])),
                min_size=0, max_size=4000))
@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
def test_any_voice_array_is_a_normalized_voice_or_a_user_error(values):
    audio = np.array(values, np.float32)
    try:
        v = read_voice(audio)
    except UserError:
        # the reader's own test, in float64 (float32's 1e-5 is just under the double 1e-5)
        assert audio.size == 0 or not np.isfinite(audio).all() or float(np.max(np.abs(audio))) < 1e-5
        return
    assert v.dtype == np.float32 and v.shape == audio.shape and np.isfinite(v).all()
    # The original's rule (architecture.md §5.3): x * 10^(-25/20) / (rms + 1e-6), then a peak above 1 is scaled
    # down to 1; the eps keeps quiet clips a little under -25 dBFS.
    rms = math.sqrt(float(np.mean(audio.astype(np.float64) ** 2)))
    want_db = 20 * math.log10(10 ** (-25 / 20) * rms / (rms + 1e-6))
    rms_db = 20 * math.log10(math.sqrt(float(np.mean(v.astype(np.float64) ** 2))))
    assert np.abs(v).max() <= 1.0 + 1e-6 and (abs(rms_db - want_db) < 1e-3 or np.abs(v).max() > 0.99)


@given(st.binary(max_size=2000))
@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_bytes_as_a_voice_file_are_a_voice_or_a_user_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("bytes") / "voice.wav"
    path.write_bytes(data)
    try:
        v = read_voice(path)
    except UserError:
        return
    assert v.ndim == 1 and np.isfinite(v).all()


@given(st.integers(8000, 96000), st.integers(1, 3))
@settings(max_examples=20, deadline=None)
def test_any_rate_and_channels_read_as_24k_mono(tmp_path_factory, rate, channels):
    path = tmp_path_factory.mktemp("rates") / "voice.wav"
    n = rate // 2
    t = np.arange(n) / rate
    sf.write(path, np.stack([0.3 * np.sin(2 * np.pi * 220 * t)] * channels, axis=1).astype(np.float32), rate)
    v = read_voice(path)
    assert v.ndim == 1 and abs(len(v) - 12000) <= 2
