"""WS /v1/audio/speech/stream: the live-speech protocol on a real server (127.0.0.1) for both model families.

The realtime server runs the tiny realtime model with `--force-frames` (each utterance stops after
`live.FORCED_FRAMES` frames); its audio must equal `vv.generate` on the whole text with the same seed and preset,
whatever the delta boundaries. The 1.5B server is the shared tiny one: it speaks sentence by sentence.
"""

import base64
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

import server_helpers as sh

websockets = pytest.importorskip("websockets")
from websockets.sync.client import connect  # noqa: E402

from vibevoice_mlx.server.encode import to_pcm16  # noqa: E402
from vibevoice_mlx.server.live import FORCED_FRAMES, forced_eos  # noqa: E402

REALTIME = Path(__file__).parent / "data" / "realtime_tiny"
HOP = 3200  # the tiny realtime model's samples per frame
TEXT = "Hello world, how are you today? Fine."
PIECES = ["Hel", "lo wor", "ld, how a", "re you to", "day? Fi", "ne."]  # split inside words


@pytest.fixture(scope="module")
def rt_server(tmp_path_factory, monkeypatch_module):
    root = tmp_path_factory.mktemp("ws")
    (root / "cache" / "realtime-voices").mkdir(parents=True)
    shutil.copy(REALTIME / "voice.pt", root / "cache" / "realtime-voices" / "test_voice.pt")
    monkeypatch_module.setenv("VIBEVOICE_MLX_CACHE", str(root / "cache"))
    monkeypatch_module.setenv("VIBEVOICE_MLX_OFFLINE", "1")
    server = sh.ServerProcess(REALTIME / "model", root / "voices", root, "--tokenizer", str(REALTIME / "tokenizer"),
                              "--ws-idle-timeout", "2", "--ws-max-message-bytes", "2048",
                              "--max-input-chars", "500", "--grace", "5")
    yield server.wait_ready()
    server.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def rt_pipe(tmp_path_factory):
    import vibevoice_mlx as vv

    pipe = vv.load(str(REALTIME / "model"), tokenizer=str(REALTIME / "tokenizer"))
    return pipe


def ws_url(server, key=True) -> str:
    url = f"ws://127.0.0.1:{server.port}/v1/audio/speech/stream"
    return url + (f"?api_key={server.api_key}" if key and server.api_key else "")


def send(ws, **msg):
    ws.send(json.dumps(msg))


def utterance(ws, timeout=120.0):
    """Audio bytes and the speech.audio.done of one utterance (binary or base64 transport)."""
    audio = b""
    while True:
        m = ws.recv(timeout=timeout)
        if isinstance(m, bytes):
            audio += m
            continue
        m = json.loads(m)
        if m["type"] == "speech.audio.delta":
            audio += base64.b64decode(m["audio"])
        elif m["type"] == "speech.audio.done":
            return audio, m
        else:
            raise AssertionError(m)


def closing(ws, timeout=30.0):
    """The messages until the server closes: (messages, close code)."""
    out = []
    try:
        while True:
            m = ws.recv(timeout=timeout)
            out.append(m if isinstance(m, bytes) else json.loads(m))
    except websockets.exceptions.ConnectionClosed as e:
        return out, e.rcvd.code if e.rcvd else None


def realtime_reference(pipe, text, seed) -> bytes:
    import vibevoice_mlx as vv

    audio = vv.generate(pipe, text, voices=[str(REALTIME / "voice.pt")], seed=seed, eos_rule=forced_eos).audio
    return to_pcm16(audio)


@pytest.mark.parametrize("transport", ["binary", "base64"])
def test_realtime_audio_equals_the_whole_text_run(rt_server, rt_pipe, transport):
    with connect(ws_url(rt_server)) as ws:
        send(ws, type="session.config", voice="test_voice", seed=7, audio_transport=transport)
        created = json.loads(ws.recv(timeout=30))
        assert created["type"] == "session.created" and created["sample_rate"] == 24000 and created["format"] == "pcm"
        for piece in PIECES:
            send(ws, type="input.text", text=piece)
        send(ws, type="input.done")
        audio, done = utterance(ws)
        # input.done keeps the connection: more text is a new utterance (same config, same seed again).
        send(ws, type="input.text", text="Second one.")
        send(ws, type="session.close")
        second, done2 = utterance(ws)
        messages, code = closing(ws)
    assert code == 1000 and messages == []
    assert audio == realtime_reference(rt_pipe, TEXT, 7)
    assert len(audio) == 2 * FORCED_FRAMES * HOP
    assert done["usage"]["characters"] == len(TEXT)
    assert done["usage"]["audio_seconds"] == pytest.approx(FORCED_FRAMES * HOP / 24000)
    assert 0 < done["usage"]["time_to_first_audio_s"] < 60
    assert second == realtime_reference(rt_pipe, "Second one.", 7)
    assert done2["usage"]["characters"] == len("Second one.")


def test_two_sessions_share_the_batch_and_each_equals_its_solo_run(rt_server, rt_pipe):
    with connect(ws_url(rt_server)) as a, connect(ws_url(rt_server)) as b:
        send(a, type="session.config", voice="test_voice", seed=1)
        send(b, type="session.config", voice="test_voice", seed=2)
        a.recv(timeout=30), b.recv(timeout=30)
        send(a, type="input.text", text="First session speaks.")
        send(b, type="input.text", text="Another one, a bit")
        send(a, type="input.done")
        send(b, type="input.text", text=" later.")
        send(b, type="input.done")
        got_a, _ = utterance(a)
        got_b, _ = utterance(b)
    assert got_a == realtime_reference(rt_pipe, "First session speaks.", 1)
    assert got_b == realtime_reference(rt_pipe, "Another one, a bit later.", 2)


@pytest.mark.parametrize("first, code, close", [
    ({"type": "input.text", "text": "hi"}, "invalid_message", 1008),
    ({"type": "session.config", "voice": "nobody"}, "unknown_voice", 1008),
    ({"type": "session.config", "model": "gpt-9"}, "unknown_model", 1008),
    ({"type": "session.config", "audio_transport": "carrier-pigeon"}, "invalid_config", 1008),
    ({"type": "session.config", "pad": "x" * 4000}, "message_too_large", 1009),
])
def test_a_bad_first_message_is_an_error_and_a_clean_close(rt_server, first, code, close):
    with connect(ws_url(rt_server)) as ws:
        ws.send(json.dumps(first))
        messages, got = closing(ws)
    assert [m["code"] for m in messages] == [code] and messages[0]["type"] == "error" and messages[0]["message"]
    assert got == close


def test_a_bad_key_is_refused(rt_server):
    with connect(ws_url(rt_server, key=False)) as ws:
        messages, code = closing(ws)
    assert messages[0]["code"] == "invalid_api_key" and code == 1008
    with connect(ws_url(rt_server, key=False), additional_headers=rt_server.auth()) as ws:
        send(ws, type="session.config", voice="test_voice")
        assert json.loads(ws.recv(timeout=30))["type"] == "session.created"


def test_an_unknown_message_type_keeps_the_session(rt_server):
    with connect(ws_url(rt_server)) as ws:
        send(ws, type="session.config", voice="test_voice", seed=1)
        ws.recv(timeout=30)
        send(ws, type="input.nonsense")
        assert json.loads(ws.recv(timeout=30))["code"] == "invalid_message"
        send(ws, type="input.text", text="Still here.")
        send(ws, type="session.close")
        audio, _ = utterance(ws)
    assert len(audio) == 2 * FORCED_FRAMES * HOP


def test_too_long_and_idle_sessions_are_closed(rt_server):
    with connect(ws_url(rt_server)) as ws:
        send(ws, type="session.config", voice="test_voice")
        ws.recv(timeout=30)
        for _ in range(3):
            send(ws, type="input.text", text="x" * 200)
        messages, code = closing(ws)
    assert messages[-1]["code"] == "session_too_long" and code == 1008
    with connect(ws_url(rt_server)) as ws:
        send(ws, type="session.config", voice="test_voice")
        ws.recv(timeout=30)
        start = time.monotonic()
        messages, code = closing(ws)
    assert messages[-1]["code"] == "idle_timeout" and code == 1000 and 1.5 < time.monotonic() - start < 20


def test_a_client_that_leaves_mid_stream_frees_its_row(rt_server, rt_pipe):
    with connect(ws_url(rt_server)) as ws:
        send(ws, type="session.config", voice="test_voice", seed=4)
        ws.recv(timeout=30)
        send(ws, type="input.text", text="I will not wait for the end of this")  # text not final: the row waits
    # The next session is served at once: the left row no longer holds the batch.
    with connect(ws_url(rt_server)) as ws:
        send(ws, type="session.config", voice="test_voice", seed=5)
        ws.recv(timeout=30)
        send(ws, type="input.text", text="Next.")
        send(ws, type="session.close")
        audio, _ = utterance(ws, timeout=60)
    assert audio == realtime_reference(rt_pipe, "Next.", 5)
