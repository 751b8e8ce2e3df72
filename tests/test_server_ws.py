"""WS /v1/audio/speech/stream: the live-speech protocol on a real server (127.0.0.1) for both model families.

The realtime server runs the tiny realtime model with `--force-frames` (each utterance stops after
`live.FORCED_FRAMES` frames); its audio must equal `vv.generate` on the whole text with the same seed and preset,
whatever the delta boundaries. The 1.5B server is the shared tiny one: it speaks sentence by sentence.
"""

import base64
import json
import signal
import time

import numpy as np
import pytest

import server_helpers as sh

import websockets  # noqa: E402  (the server extra, which the test extra includes)
from websockets.sync.client import connect  # noqa: E402

from vibevoice_mlx.server.encode import to_pcm16  # noqa: E402
from vibevoice_mlx.server.live import FORCED_FRAMES, forced_eos  # noqa: E402

REALTIME = sh.REALTIME
HOP = 3200  # the tiny realtime model's samples per frame
TEXT = "Hello world, how are you today? Fine."
PIECES = ["Hel", "lo wor", "ld, how a", "re you to", "day? Fi", "ne."]  # split inside words


@pytest.fixture(scope="module")
def rt_server(tmp_path_factory):
    server = sh.realtime_server(tmp_path_factory.mktemp("ws"), "--ws-idle-timeout", "2",
                                "--ws-max-message-bytes", "2048", "--max-input-chars", "500", "--grace", "5")
    yield server.wait_ready()
    server.stop()


@pytest.fixture(scope="module")
def rt_pipe(tmp_path_factory):
    import vibevoice_mlx as vv

    pipe = vv.load(str(REALTIME / "model"), tokenizer=str(REALTIME / "tokenizer"), batch_invariant=True)  # as serve
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
    # One that leaves while its audio is being sent: its row stops, the server logs no traceback.
    with connect(ws_url(rt_server)) as ws:
        send(ws, type="session.config", voice="test_voice", seed=5)
        ws.recv(timeout=30)
        send(ws, type="input.text", text="Leaving while this is spoken.")
        send(ws, type="input.done")
        assert isinstance(ws.recv(timeout=30), bytes)
    deadline = time.monotonic() + 10
    while (rt_server.health()["live_rows"] or rt_server.health()["live_sessions"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rt_server.health()["live_rows"] == 0 and rt_server.health()["live_sessions"] == 0
    assert "Traceback" not in rt_server.log(), rt_server.log()[-3000:]


def test_sigterm_during_streaming_drains_then_closes(tmp_path, rt_pipe):
    server = sh.realtime_server(tmp_path, "--grace", "20").wait_ready()
    try:
        with connect(ws_url(server)) as ws:
            send(ws, type="session.config", voice="test_voice", seed=6)
            ws.recv(timeout=30)
            send(ws, type="input.text", text="Pending text that is spoken")
            time.sleep(0.5)
            server.terminate()
            audio, done = utterance(ws)  # what was pending is spoken, then the session ends
            messages, code = closing(ws)
        assert audio == realtime_reference(rt_pipe, "Pending text that is spoken", 6)
        assert [m["code"] for m in messages] == ["shutting_down"] and code == 1001
        assert server.proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
        assert "Traceback" not in server.log()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server15(tiny, tmp_path_factory):
    return sh.shared_server(tiny, tmp_path_factory)


def test_15b_speaks_sentence_by_sentence(server15, tiny, tmp_path_factory):
    pipe = sh.pipe(tiny, tmp_path_factory.mktemp("ref"))
    with connect(ws_url(server15)) as ws:
        send(ws, type="session.config", model="tts-1", seed=3, max_seconds=sh.seconds_for(3),
             audio_transport="base64")
        assert json.loads(ws.recv(timeout=30))["type"] == "session.created"
        for piece in ["Speaker 1: First sent", "ence. Speaker 1: Sec", "ond one"]:
            send(ws, type="input.text", text=piece)
        send(ws, type="input.done")
        audio, done = utterance(ws)
        send(ws, type="session.close")
        messages, code = closing(ws)
    want = [sh.reference_pcm(pipe, s, 3, 3) for s in ("Speaker 1: First sentence.", "Speaker 1: Second one")]
    assert np.array_equal(np.frombuffer(audio, "<i2"), np.concatenate(want))
    assert done["usage"]["characters"] == len("Speaker 1: First sentence. Speaker 1: Second one")
    assert done["usage"]["audio_seconds"] == pytest.approx(2 * sh.seconds_for(3))
    assert messages == [] and code == 1000


def test_15b_unknown_saved_voice(server15):
    with connect(ws_url(server15)) as ws:
        send(ws, type="session.config", voice="nobody")
        messages, code = closing(ws)
    assert messages[0]["code"] == "unknown_voice" and code == 1008


def test_post_speech_with_the_realtime_model_and_its_presets(rt_server, rt_pipe):
    r = rt_server.speech(input=TEXT, voice="test_voice", seed=9, response_format="pcm")
    assert r.status == 200, r.body[:300]
    assert r.body == realtime_reference(rt_pipe, TEXT, 9)
    bad = rt_server.speech(input=TEXT, voice="nobody", response_format="pcm")
    assert bad.status == 400 and bad.error["code"] == "voice_not_found"
    presets = {p["id"]: p for p in rt_server.request("GET", "/v1/voices").json()["presets"]}
    assert presets["test_voice"] == {"id": "test_voice", "object": "voice.preset", "known": False,
                                     "downloaded": True}
    assert presets["en-Carter_man"]["known"] and not presets["en-Carter_man"]["downloaded"]


def test_a_session_waiting_for_text_holds_no_one_up(rt_server, rt_pipe):
    with connect(ws_url(rt_server)) as a, connect(ws_url(rt_server)) as b:
        send(a, type="session.config", voice="test_voice", seed=11)
        send(b, type="session.config", voice="test_voice", seed=12)
        a.recv(timeout=30), b.recv(timeout=30)
        send(a, type="input.text", text="A slow typist who writes")  # a window and a half: then a wait
        time.sleep(0.3)
        send(b, type="input.text", text="Quick one.")
        send(b, type="input.done")
        got_b, _ = utterance(b, timeout=30)  # while a still waits for its text
        send(a, type="input.text", text=" on and on.")
        send(a, type="input.done")
        got_a, _ = utterance(a)
    assert got_b == realtime_reference(rt_pipe, "Quick one.", 12)
    assert got_a == realtime_reference(rt_pipe, "A slow typist who writes on and on.", 11)


def test_several_models_in_one_server(tiny, tmp_path, rt_pipe):
    big = sh.model_folder(tiny, tmp_path)
    server = sh.realtime_server(tmp_path, "--model", str(big), "--tokenizer", "").wait_ready()
    try:
        ids = [m["id"] for m in server.request("GET", "/v1/models").json()["data"]]
        assert ids == ["model", big.name]
        # An OpenAI alias means the first model (realtime); the other is chosen by its id.
        first = server.speech(input="Alias.", voice="test_voice", seed=2, response_format="pcm")
        assert first.status == 200 and first.body == realtime_reference(rt_pipe, "Alias.", 2)
        other = server.speech(model=big.name, input="Speaker 1: Other.", seed=3, response_format="pcm",
                              max_seconds=sh.seconds_for(3))
        want = sh.reference_pcm(sh.pipe(tiny, tmp_path), "Speaker 1: Other.", 3, 3)
        assert other.status == 200 and np.array_equal(np.frombuffer(other.body, "<i2"), want)
        with connect(ws_url(server)) as ws:
            send(ws, type="session.config", model=big.name, seed=3, max_seconds=sh.seconds_for(3))
            assert json.loads(ws.recv(timeout=30))["model"] == big.name
            send(ws, type="input.text", text="Speaker 1: Other.")
            send(ws, type="session.close")
            audio, _ = utterance(ws)
        assert np.array_equal(np.frombuffer(audio, "<i2"), want)
        missing = server.speech(model="nope", input="x")
        assert missing.status == 404 and "'model'" in missing.error["message"]
    finally:
        server.stop()


def test_serve_refuses_two_models_of_one_name_and_a_tokenizer_count_that_does_not_fit(tmp_path):
    from click.testing import CliRunner

    from vibevoice_mlx.server.cli import serve

    (tmp_path / "a" / "m").mkdir(parents=True), (tmp_path / "b" / "m").mkdir(parents=True)
    r = CliRunner().invoke(serve, ["--model", str(tmp_path / "a" / "m"), "--model", str(tmp_path / "b" / "m")])
    assert r.exit_code == 2 and "two models are named 'm'" in r.output
    r = CliRunner().invoke(serve, ["--model", "x", "--model", "y", "--model", "z", "--tokenizer", "t",
                                   "--tokenizer", "u"])
    assert r.exit_code == 2 and "one per --model (3), not 2" in r.output


def test_15b_speaks_in_the_sessions_saved_voice(server15):
    clip = np.random.default_rng(3).standard_normal(6400).astype(np.float32) * 0.1
    r = server15.upload_voice("ws_voice", sh.wav_bytes(clip), overwrite="true")
    assert r.status in (200, 201), r.body[:300]
    sentences = ["Speaker 1: One.", "Speaker 1: Two!"]
    want = b"".join(server15.speech(input=s, voice="ws_voice", seed=8, response_format="pcm",
                                    max_seconds=sh.seconds_for(3)).body for s in sentences)
    plain = server15.speech(input=sentences[0], seed=8, response_format="pcm", max_seconds=sh.seconds_for(3)).body
    with connect(ws_url(server15)) as ws:
        send(ws, type="session.config", voice="ws_voice", seed=8, max_seconds=sh.seconds_for(3))
        assert json.loads(ws.recv(timeout=30))["voice"] == "ws_voice"
        send(ws, type="input.text", text=" ".join(sentences))
        send(ws, type="session.close")
        audio, _ = utterance(ws)
    assert audio == want and audio[:len(plain)] != plain  # the voice was used


def test_an_utterance_the_model_ends_before_input_done_leaves_the_session_as_it_was(rt_server, rt_pipe):
    """The model's own stop (EOS; forced here) ends an utterance whose text was never flushed: its
    speech.audio.done comes; text until input.done still belongs to it and is not spoken (as in the whole-text run);
    input.done closes it without another done; the next text is a new utterance; the idle timeout holds."""
    long_text = "Pending text, never flushed, and it goes on for a while longer than the stop."
    with connect(ws_url(rt_server)) as ws:
        send(ws, type="session.config", voice="test_voice", seed=3)
        json.loads(ws.recv(timeout=30))
        send(ws, type="input.text", text=long_text)
        first, done = utterance(ws)
        send(ws, type="input.text", text=" More of the same utterance.")
        send(ws, type="input.done")
        send(ws, type="input.text", text="Second one.")
        send(ws, type="input.done")
        second, done2 = utterance(ws)
        messages, code = closing(ws, timeout=30)  # nothing more is sent: the session idles out
    assert len(first) == FORCED_FRAMES * HOP * 2 and done["usage"]["characters"] == len(long_text)
    assert first == realtime_reference(rt_pipe, long_text + " More of the same utterance.", 3)
    assert second == realtime_reference(rt_pipe, "Second one.", 3) and done2["usage"]["characters"] == 11
    assert [m.get("code") for m in messages] == ["idle_timeout"] and code == 1000
