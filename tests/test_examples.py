"""The examples in vibevoice_mlx/examples/ run as a user runs them, against a server on 127.0.0.1."""

import numpy as np
import pytest
import soundfile as sf

import ws_standin

pytest.importorskip("websockets")


@pytest.fixture(scope="module")
def standin():
    server = ws_standin.StandIn()
    yield server
    server.stop()


def test_agent_stream_sends_words_as_they_come_and_saves_the_audio_as_it_arrives(standin, tmp_path, capsys):
    from vibevoice_mlx.examples import agent_stream

    out = tmp_path / "agent.wav"
    text = "Hello there, this is an agent speaking."
    stats = agent_stream.main(["--url", f"ws://127.0.0.1:{standin.port}/v1/audio/speech/stream", "--api-key",
                               standin.api_key, "--voice", "en-Emma_woman", "--seed", "7", "--text", text,
                               "--delay", "0.01", "--out", str(out)])
    got = standin.received[-(len(text.split()) + 2):]
    assert got[0] == {"type": "session.config", "voice": "en-Emma_woman", "seed": 7, "response_format": "pcm",
                      "audio_transport": "binary"}
    pieces = [m["text"] for m in got[1:-1]]
    assert all(m["type"] == "input.text" for m in got[1:-1]) and "".join(pieces) == text
    assert got[-1] == {"type": "session.close"}
    # The stand-in answers each delta with one frame whose samples are the delta's length: the WAV holds them in
    # order, whole.
    audio, sr = sf.read(out, dtype="int16")
    assert sr == 24000 and audio.shape == (len(pieces) * ws_standin.FRAME,)
    assert np.array_equal(audio, np.repeat([len(p) for p in pieces], ws_standin.FRAME))
    assert stats["frames"] == len(pieces) and stats["usage"]["characters"] == len(text)
    assert stats["time_to_first_audio_s"] is not None and stats["error"] is None
    printed = capsys.readouterr().out
    assert "time to first audio:" in printed and f"got {len(pieces)} frames" in printed
