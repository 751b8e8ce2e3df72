"""`vibevoice-mlx bench` for VibeVoice-Realtime-0.5B on the tiny realtime model (tests/data/realtime_tiny): what
it reports and how the figures hang together (not how fast anything is), the floor of realtime.md §7.2, and the
random full-size checkpoint's key structure."""

from pathlib import Path

import pytest

from vibevoice_mlx import realtime_api

DATA = Path(__file__).parent / "data" / "realtime_tiny"


@pytest.fixture(scope="module")
def rt_pipe():
    return realtime_api.load(DATA / "model", dtype="float32", tokenizer=DATA / "tokenizer")


@pytest.fixture(scope="module")
def rt_voice(tmp_path_factory):
    """The tiny model's preset, converted as a user's `.pt` is."""
    from vibevoice_mlx.presets import convert_pt

    path = tmp_path_factory.mktemp("voice") / "voice.safetensors"
    convert_pt(DATA / "voice.pt", path)
    return path


def test_stream_generate_yields_each_frame_before_computing_the_next(rt_pipe, rt_voice):
    """The first audio goes out as soon as frame 0 is decoded: before its feedback forwards and EOS decision
    (which `eos_rule` sees), not a frame later."""
    seen = []

    def rule(frame, probability):
        seen.append(frame)
        return frame >= 2

    stream = realtime_api.stream_generate(rt_pipe, "Hello there.", rt_voice, eos_rule=rule)
    first = next(stream)
    assert first.audio.size == rt_pipe.hop_length and first.frames == 1 and not first.finished
    assert seen == []  # frame 0's stop decision has not been taken yet
    rest = list(stream)
    assert [r.frames for r in rest] == [2, 3, 3] and seen == [0, 1, 2]
    assert rest[-1].finished and rest[-1].audio.size == 0 and not any(r.finished for r in rest[:-1])
