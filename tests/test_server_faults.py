"""Faults: a client that leaves mid-stream, requests that are malformed at every layer, and SIGTERM."""

import json
import signal
import socket
import threading
import time

import numpy as np
import pytest

import server_helpers as sh

LONG = "Speaker 1: " + "This sentence goes on and on, so that the stream lasts long enough. " * 25


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    return sh.shared_server(tiny, tmp_path_factory)


def test_a_client_that_leaves_mid_stream_frees_its_slot(server):
    before = server.wait_idle()
    conn = server.connect()
    body = json.dumps({"model": "tts-1", "input": LONG, "response_format": "pcm", "seed": 1})
    conn.request("POST", "/v1/audio/speech", body, {**server.auth(), "Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and len(r.read(64)) == 64
    left = time.monotonic()
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    after = server.wait_idle(timeout=10)
    freed = time.monotonic() - left
    assert after["cancelled"] == before["cancelled"] + 1 and after["completed"] == before["completed"]
    # The whole script would take far longer (hundreds of frames); the job stopped within a few frames.
    assert freed < 5, freed
    ok = server.speech(input="Speaker 1: Next.", response_format="pcm", seed=2, max_seconds=sh.seconds_for(3))
    assert ok.status == 200 and len(ok.body) == 2 * 3 * sh.HOP


def open_stream(server, seed: int) -> socket.socket:
    """A long speech request on a bare socket, not read: the test decides when the client leaves."""
    body = json.dumps({"model": "tts-1", "input": LONG, "response_format": "pcm", "seed": seed}).encode()
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    s.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Authorization: Bearer {server.api_key}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    return s


def wait_health(server, condition, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = server.health()
        if condition(h):
            return h
        time.sleep(0.02)
    raise AssertionError(f"health never matched: {server.health()}")


def test_a_client_that_leaves_while_queued_is_dropped_from_the_queue(server):
    before = server.wait_idle()
    running = [open_stream(server, 10 + i) for i in range(before["max_batch"])]
    try:
        wait_health(server, lambda h: h["active"] == before["max_batch"])
        waiting = open_stream(server, 20)
        wait_health(server, lambda h: h["queued"] == 1)
        waiting.close()
        h = wait_health(server, lambda h: h["queued"] == 0, timeout=3)
        assert h["cancelled"] == before["cancelled"] + 1 and h["active"] == before["max_batch"]
    finally:
        for s in running:
            s.close()
    after = server.wait_idle(timeout=10)
    assert after["cancelled"] == before["cancelled"] + 1 + before["max_batch"]
    assert after["completed"] == before["completed"]


def raw(server, data: bytes, timeout: float = 5.0) -> bytes:
    """Send bytes as they are and return whatever comes back before the server closes or goes quiet."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (socket.timeout, ConnectionResetError):
            pass
        return out


def test_malformed_requests_never_take_the_server_down(server):
    key = f"Authorization: Bearer {server.api_key}\r\n".encode()
    raw_requests = [
        b"GARBAGE\r\n\r\n",
        b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\n" + key + b"Content-Length: 500\r\n\r\n{\"model\":",
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n",
        b"POST /v1/voices HTTP/1.1\r\nHost: x\r\n" + key + b"Content-Type: multipart/form-data; boundary=zz\r\n"
        b"Content-Length: 20\r\n\r\n--zz\r\nnot a part\r\n",
        b"POST /v1/voices HTTP/1.1\r\nHost: x\r\n" + key + b"Content-Type: multipart/form-data; boundary=zz\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\n--zz\r\n0\r\n\r\n",
    ]
    for data in raw_requests:
        reply = raw(server, data)
        assert reply == b"" or reply.startswith(b"HTTP/1.1 4"), reply[:200]
    bodies = [{"input": 5}, {"input": ["a"]}, {"input": "Hi.", "voice": 5}, {"input": "Hi.", "voices": "alice"},
              {"input": "Hi.", "steps": 1e308}, {"input": "Hi.", "seed": 2**70}, {"input": "Hi.", "voice": {"x": 1}},
              {"input": "Hi.", "voices": [None]}, {"input": "\0\ud800"}]
    for body in bodies:
        r = server.request("POST", "/v1/audio/speech", json.dumps({"model": "tts-1", **body}).encode(),
                           headers={"Content-Type": "application/json"})
        assert 400 <= r.status < 500 and set(r.error) == {"message", "type", "param", "code"}, (body, r.body)
    r = server.request("POST", "/v1/audio/speech", b" " * (2 << 20), headers={"Content-Type": "application/json"})
    assert r.status == 413 and r.error["code"] == "request_too_large"
    deep = b"[" * 100000 + b"]" * 100000
    r = server.request("POST", "/v1/audio/speech", deep, headers={"Content-Type": "application/json"})
    assert r.status == 400 and r.error["code"] == "invalid_json"
    assert server.proc.poll() is None and server.health()["status"] == "ok"
    ok = server.speech(input="Speaker 1: Still here.", response_format="wav", seed=3, max_seconds=sh.seconds_for(3))
    assert ok.status == 200 and sh.decode(ok.body).shape == (3 * sh.HOP,)


def test_sigterm_ends_streams_cleanly_and_voices_survive_the_restart(tiny, tmp_path):
    import vibevoice_mlx as vv

    pipe = sh.pipe(tiny, tmp_path)
    voices = tmp_path / "voices"
    voices.mkdir()
    vv.save_voice(pipe, np.random.default_rng(1).standard_normal(3200).astype(np.float32) * 0.1,
                  str(voices / "kept.safetensors"))
    server = sh.ServerProcess(sh.model_folder(tiny, tmp_path), voices, tmp_path, "--max-batch", "1",
                              "--grace", "1").wait_ready()
    try:
        # A voice saved before this server started (by an earlier one, or by hand) is there to use.
        assert [v["id"] for v in server.request("GET", "/v1/voices").json()["data"]] == ["kept"]
        conn = server.connect()
        conn.request("POST", "/v1/audio/speech", json.dumps({
            "model": "tts-1", "input": LONG, "voice": "kept", "response_format": "pcm", "stream_format": "sse",
            "seed": 4}), {**server.auth(), "Content-Type": "application/json"})
        stream = conn.getresponse()
        assert stream.status == 200 and stream.readline().startswith(b"data: ")
        queued = {}
        waiter = threading.Thread(target=lambda: queued.update(r=server.speech(input="Speaker 1: Queued.", seed=5)))
        waiter.start()
        deadline = time.monotonic() + 10
        while server.health()["queued"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        rest = stream.read()  # raises IncompleteRead if the stream is cut instead of ended
        ended = time.monotonic() - signalled
        waiter.join(10)
        code = server.proc.wait(20)
    finally:
        server.stop()
    events = sh.sse_events(b"data: " + rest.split(b"data: ", 1)[1]) if b"data: " in rest else []
    assert events and events[-1]["type"] == "speech.audio.done" and events[-1]["truncated"] is True
    assert ended < 8, ended  # --grace 1: the running stream was ended, not waited for to the length rule
    assert queued["r"].status == 503 and queued["r"].error["code"] == "shutting_down"
    assert "retry-after" in queued["r"].headers
    assert code in (0, -signal.SIGTERM), code
    assert "Draining" in server.log() and "Traceback" not in server.log()
