"""Load and backpressure on the live WebSocket: 16 realtime sessions arriving staggered, each fed its text in random
pieces at random times, share one batch; none is lost or mixed up, each equals its solo run; the time to first
audio (p50/p95) and the server's memory before and after are logged. A reader that falls behind has its utterance
stopped before the audio queued for it passes a fixed bound."""

import asyncio
import json
import logging
import random
import statistics
import threading
import time

import numpy as np
import pytest

import server_helpers as sh

websockets = pytest.importorskip("websockets")
from websockets.sync.client import connect  # noqa: E402

from vibevoice_mlx.server import stream  # noqa: E402
from vibevoice_mlx.server.encode import to_pcm16  # noqa: E402
from vibevoice_mlx.server.live import forced_eos  # noqa: E402

logger = logging.getLogger(__name__)

SESSIONS = 16
TEXTS = ["Good morning, here is the news.", "The weather stays dry and warm all week.",
         "Your order has shipped today.", "Please hold while I connect you."]


def pieces(text: str, rng: random.Random):
    cuts = sorted(rng.sample(range(1, len(text)), 4))
    return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


def test_sixteen_staggered_sessions_each_equal_their_solo_run(tmp_path):
    import vibevoice_mlx as vv

    pipe = vv.load(str(sh.REALTIME / "model"), tokenizer=str(sh.REALTIME / "tokenizer"))
    want = {i: to_pcm16(vv.generate(pipe, TEXTS[i % len(TEXTS)], voices=[str(sh.REALTIME / "voice.pt")], seed=i,
                                    eos_rule=forced_eos).audio) for i in range(SESSIONS)}
    server = sh.realtime_server(tmp_path, "--grace", "5").wait_ready()
    try:
        before = server.rss_mb()
        results = [None] * SESSIONS

        def client(i):
            rng = random.Random(i)
            time.sleep(0.15 * i)  # staggered arrivals: each joins a batch already running
            try:
                with connect(f"ws://127.0.0.1:{server.port}/v1/audio/speech/stream?api_key={server.api_key}") as ws:
                    ws.send(json.dumps({"type": "session.config", "voice": "test_voice", "seed": i}))
                    json.loads(ws.recv(timeout=60))
                    for piece in pieces(TEXTS[i % len(TEXTS)], rng):
                        ws.send(json.dumps({"type": "input.text", "text": piece}))
                        time.sleep(rng.random() * 0.1)
                    ws.send(json.dumps({"type": "session.close"}))
                    audio, done = b"", None
                    for m in ws:
                        if isinstance(m, bytes):
                            audio += m
                        else:
                            done = json.loads(m)
                    results[i] = (audio, done)
            except Exception as e:  # noqa: BLE001 - reported below as a lost session
                results[i] = e

        threads = [threading.Thread(target=client, args=(i,)) for i in range(SESSIONS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        time.sleep(0.5)
        after = server.rss_mb()
    finally:
        server.stop()
    lost = [i for i, r in enumerate(results) if not isinstance(r, tuple)]
    assert not lost, [results[i] for i in lost]
    for i, (audio, done) in enumerate(results):
        assert done["type"] == "speech.audio.done", done
        assert audio == want[i], f"session {i} differs from its solo run"
    ttfa = sorted(r[1]["usage"]["time_to_first_audio_s"] for r in results)
    p50, p95 = statistics.median(ttfa), ttfa[int(0.95 * (len(ttfa) - 1))]
    logger.warning("16 staggered WS sessions: time to first audio p50 %.3f s, p95 %.3f s; server RSS %.0f MB "
                   "before, %.0f MB after", p50, p95, before, after)
    assert after - before < 300, (before, after)


def test_a_slow_reader_has_its_utterance_stopped_at_a_bound(monkeypatch):
    """The worker emits frames faster than the reader takes them: past MAX_BEHIND_FRAMES the utterance is
    cancelled and an error queued; the queue never holds more."""
    monkeypatch.setattr(stream, "MAX_BEHIND_FRAMES", 4)

    class Worker:
        woken = 0

        def wake(self):
            Worker.woken += 1

    async def run():
        session = stream.Session.__new__(stream.Session)
        session.loop, session.worker = asyncio.get_running_loop(), Worker()
        utt = {"events": asyncio.Queue(), "queued": 0, "jobs": [], "live": stream.Utterance(None, 0, 5, 1.5, None)}
        emit = session.emitter(utt)
        for _ in range(10):
            emit("audio", np.zeros(8, np.float32))
        await asyncio.sleep(0.05)
        return utt

    utt = asyncio.run(run())
    kinds = [utt["events"].get_nowait()[0] for _ in range(utt["events"].qsize())]
    assert kinds == ["audio"] * 4 + ["error"]
    assert utt["live"].cancelled.is_set()
