"""The examples in vibevoice_mlx/examples/ run as a user runs them, against a server on 127.0.0.1."""

import numpy as np
import pytest
import soundfile as sf

import live_helpers

import websockets  # noqa: E402,F401  (the server extra, which the test extra includes)


@pytest.fixture(scope="module")
def standin():
    server = live_helpers.StandIn()
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
    assert sr == 24000 and audio.shape == (len(pieces) * live_helpers.FRAME,)
    assert np.array_equal(audio, np.repeat([len(p) for p in pieces], live_helpers.FRAME))
    assert stats["frames"] == len(pieces) and stats["usage"]["characters"] == len(text)
    assert stats["time_to_first_audio_s"] is not None and stats["error"] is None
    printed = capsys.readouterr().out
    assert "time to first audio:" in printed and f"got {len(pieces)} frames" in printed


@pytest.fixture(scope="module")
def rt_server(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    server = live_helpers.realtime_server(tmp_path_factory.mktemp("rt"), mp).wait_ready()
    yield server
    server.stop()
    mp.undo()


def test_agent_stream_on_the_realtime_server_saves_what_the_whole_text_gives(rt_server, tmp_path, capsys):
    import vibevoice_mlx as vv
    from vibevoice_mlx.examples import agent_stream
    from vibevoice_mlx.server.encode import to_pcm16
    from vibevoice_mlx.server.live import forced_eos

    out = tmp_path / "agent.wav"
    text = "Hello world, how are you today? Fine."
    stats = agent_stream.main(["--url", f"ws://127.0.0.1:{rt_server.port}/v1/audio/speech/stream", "--api-key",
                               rt_server.api_key, "--voice", live_helpers.PRESET, "--seed", "7", "--text", text,
                               "--delay", "0.02", "--out", str(out)])
    assert stats["error"] is None and stats["voice"] == live_helpers.PRESET
    # With forced frames the model stops after FORCED_FRAMES frames, maybe before the last words came.
    assert stats["words"] == len(text.split()) and 0 < stats["usage"]["characters"] <= len(text)
    # The words went out one by one; the audio is the whole text's, as vv.generate makes it with the same seed.
    pipe = vv.load(str(live_helpers.REALTIME / "model"), tokenizer=str(live_helpers.REALTIME / "tokenizer"),
                   batch_invariant=True)  # as serve loads it
    reference = vv.generate(pipe, text, voices=[str(live_helpers.REALTIME / "voice.pt")], seed=7,
                            eos_rule=forced_eos).audio
    assert out.read_bytes()[44:] == to_pcm16(reference)
    assert stats["audio_seconds"] == pytest.approx(len(reference) / 24000)
    assert 0 < stats["time_to_first_audio_s"] < 60
    assert "time to first audio:" in capsys.readouterr().out
