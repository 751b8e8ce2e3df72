"""The speech route over a fake engine, in this process (uvicorn in a thread on a free 127.0.0.1 port): what a
client sees when generation fails before the audio starts, after it started, or makes no audio at all."""

import http.client
import json
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

import server_helpers as sh


def engine(pipe, scripts, voices=None, **options):
    """Audio frames of 4 samples; the script says what goes wrong: "fail early", "fail late" (after 2 frames),
    "silent" (no audio), anything else 3 frames."""
    for i, script in enumerate(scripts):
        if script == "fail early":
            raise ValueError("The script has no text to speak.")
        frames = 0 if script == "silent" else 3
        for f in range(frames):
            if script == "fail late" and f == 2:
                raise RuntimeError("the accelerator fell over")
            yield i, SimpleNamespace(audio=np.full(4, 0.25, np.float32), frames=f + 1, audio_seconds=0,
                                     truncated=False, finished=f == frames - 1)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import uvicorn

    from vibevoice_mlx.server import ServerConfig, Worker, create_app

    worker = Worker(lambda: SimpleNamespace(sample_rate=24000), generate=engine, free_when_idle=False).start()
    config = ServerConfig(model_id="fake", voices_dir=tmp_path_factory.mktemp("voices"))
    port = sh.free_port()
    uv = uvicorn.Server(uvicorn.Config(create_app(worker, config), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert uv.started
    yield SimpleNamespace(port=port)
    uv.should_exit = True
    thread.join(10)


def post(server, **body):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("POST", "/v1/audio/speech", json.dumps({"model": "fake", **body}),
                 {"Content-Type": "application/json"})
    return conn, conn.getresponse()


def test_an_error_before_the_audio_is_a_400(server):
    _, r = post(server, input="fail early")
    assert r.status == 400 and json.loads(r.read())["error"]["message"] == "The script has no text to speak."


def test_no_audio_at_all_is_a_clear_error(server):
    _, r = post(server, input="silent")
    assert r.status == 400 and json.loads(r.read())["error"]["code"] == "no_audio"


def test_a_failure_mid_stream_cuts_the_audio_stream(server):
    _, r = post(server, input="fail late", response_format="pcm")
    assert r.status == 200
    with pytest.raises(http.client.IncompleteRead) as e:
        r.read()
    assert len(e.value.partial) == 2 * 2 * 4  # the two frames made, then the cut: never a silent short file


def test_a_failure_mid_stream_ends_sse_with_an_error_event(server):
    _, r = post(server, input="fail late", response_format="pcm", stream_format="sse")
    events = sh.sse_events(r.read())
    assert [e["type"] for e in events] == ["speech.audio.delta"] * 2 + ["error"]
    assert events[-1]["error"]["type"] == "server_error" and "RuntimeError" in events[-1]["error"]["message"]


def test_the_server_answers_after_every_failure(server):
    _, r = post(server, input="fine", response_format="pcm")
    assert r.status == 200 and len(r.read()) == 2 * 3 * 4
