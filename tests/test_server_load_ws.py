"""Load and faults of WS /v1/audio/speech/stream on a real server (127.0.0.1), the tiny realtime model.

The server runs `--force-frames` (every utterance stops after `live.FORCED_FRAMES` frames) and `--batch-invariant`;
the reference of a session is `vv.generate` on its whole text with its seed, the same preset and the same stop, in
this process on the model loaded batch-invariant: what the session must get, whoever shared the batch.

The clients are an asyncio pool (`websockets`' asyncio client), each session a task; every wait has a bound.
`pytest tests/test_server_load_ws.py -s` prints the figures: lines starting with `[load]`.
"""

import asyncio
import json
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest

import server_helpers as sh

import websockets  # noqa: E402,F401  (the server extra, which the test extra includes)
from websockets.asyncio.client import connect  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402

from vibevoice_mlx.server.encode import to_pcm16  # noqa: E402
from vibevoice_mlx.server.live import FORCED_FRAMES, forced_eos  # noqa: E402

REALTIME = sh.REALTIME
FRAME_BYTES = 2 * 3200  # one frame of the tiny realtime model as PCM16
SESSIONS = 16
LOAD_LIMIT_S = 600  # the whole load test, all sessions together
IDLE_S = 4.0  # the module server's --ws-idle-timeout
# Words with multi-byte characters and a decomposed accent (e + U+0301), so that pieces cut between code points of
# one character as the user sees it.
WORDS = ["hello", "world", "caf\u00e9", "cafe\u0301", "na\u00efve", "\u6771\u4eac", "stra\u00dfe", "Zo\u00eb",
         "\u2014", "speech", "arrives", "today", "r\u00e9sum\u00e9", "\U0001f600", "live", "text,"]


def texts_and_pieces(n: int, seed: int):
    """n (text, pieces, pauses, arrival delay, seed) specs: seeded words, seeded cut points (inside words too)."""
    rng = random.Random(seed)
    specs = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5))).capitalize() + rng.choice(".?!")
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 6))))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        assert "".join(pieces) == text
        specs.append({"text": text, "pieces": pieces, "pauses": [rng.uniform(0, 0.15) for _ in pieces],
                      "delay": rng.uniform(0, 3.0), "seed": 1000 + i})
    return specs


def start(root: Path, *args: str) -> sh.ServerProcess:
    return sh.realtime_server(root, "--batch-invariant", "--max-input-chars", "500", *args).wait_ready()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start(tmp_path_factory.mktemp("wsload"), "--ws-idle-timeout", str(IDLE_S), "--grace", "5")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def pipe():
    import vibevoice_mlx as vv

    return vv.load(str(REALTIME / "model"), tokenizer=str(REALTIME / "tokenizer"), batch_invariant=True)


def reference(pipe, text: str, seed: int) -> bytes:
    import vibevoice_mlx as vv

    audio = vv.generate(pipe, text, voices=[str(REALTIME / "voice.pt")], seed=seed, eos_rule=forced_eos).audio
    return to_pcm16(audio)


def url(server) -> str:
    return f"ws://127.0.0.1:{server.port}/v1/audio/speech/stream?api_key={server.api_key}"


async def send(ws, **msg):
    await ws.send(json.dumps(msg))


async def open_session(server, seed: int, **kw):
    ws = await connect(url(server), max_size=None, open_timeout=30, **kw)
    await send(ws, type="session.config", voice="test_voice", seed=seed)
    created = json.loads(await asyncio.wait_for(ws.recv(), 30))
    assert created["type"] == "session.created", created
    return ws


async def utterance(ws, timeout: float = 120.0):
    """(audio bytes, speech.audio.done, time the first audio came) of the next utterance."""
    audio, first = b"", None
    while True:
        m = await asyncio.wait_for(ws.recv(), timeout)
        if isinstance(m, bytes):
            audio, first = audio + m, first or time.monotonic()
            continue
        m = json.loads(m)
        if m["type"] != "speech.audio.done":
            raise AssertionError(m)
        return audio, m, first


async def closing(ws, timeout: float = 30.0):
    """The messages until the server closes: (messages, close code)."""
    out = []
    try:
        while True:
            m = await asyncio.wait_for(ws.recv(), timeout)
            out.append(m if isinstance(m, bytes) else json.loads(m))
    except ConnectionClosed as e:
        return out, e.rcvd.code if e.rcvd else None


def wait_health(server, condition, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = server.health()
        if condition(h):
            return h
        time.sleep(0.05)
    raise AssertionError(f"health never matched: {server.health()}")


def idle(server, timeout: float = 20.0) -> dict:
    return wait_health(server, lambda h: h["live_sessions"] == 0 and h["live_rows"] == 0, timeout)


class RSS:
    """The server's VmRSS, sampled every 50 ms while `async with` runs: `before`, `peak`, `after` in MB."""

    def __init__(self, server):
        self.server = server

    async def _sample(self):
        while True:
            self.peak = max(self.peak, self.server.rss_mb())
            await asyncio.sleep(0.05)

    async def __aenter__(self):
        self.before = self.peak = self.server.rss_mb()
        self.task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc):
        self.task.cancel()
        self.after = self.server.rss_mb()
        self.peak = max(self.peak, self.after)


async def one_session(server, spec: dict, t0: float) -> dict:
    await asyncio.sleep(spec["delay"])
    ws = await open_session(server, spec["seed"])
    try:
        sent = time.monotonic()
        for piece, pause in zip(spec["pieces"], spec["pauses"]):
            await send(ws, type="input.text", text=piece)
            await asyncio.sleep(pause)
        await send(ws, type="input.done")
        audio, done, first = await utterance(ws)
        await send(ws, type="session.close")
        rest, code = await closing(ws)
    finally:
        await ws.close()
    return {"audio": audio, "done": done, "rest": rest, "code": code, "client_ttfa": first - sent,
            "arrived": sent - t0}


def pct(values, q) -> float:
    return float(np.percentile(np.asarray(values), q))


def test_sixteen_staggered_sessions_none_lost_or_mixed(server, pipe):
    specs = texts_and_pieces(SESSIONS, seed=20)
    assert len({s["text"] for s in specs}) == SESSIONS  # each session its own text (and its own seed)
    expected = [reference(pipe, s["text"], s["seed"]) for s in specs]
    idle(server)

    async def run():
        async with RSS(server) as rss:
            t0 = time.monotonic()
            results = await asyncio.wait_for(asyncio.gather(*(one_session(server, s, t0) for s in specs)),
                                             LOAD_LIMIT_S)
            wall = time.monotonic() - t0
        return results, rss, wall

    results, rss, wall = asyncio.run(run())
    after = idle(server)
    for spec, want, got in zip(specs, expected, results):
        assert got["code"] == 1000 and got["rest"] == [], (spec["text"], got["rest"], got["code"])
        assert len(got["audio"]) == FORCED_FRAMES * FRAME_BYTES, spec["text"]  # none lost
        assert got["audio"] == want, spec["text"]  # none mixed: each equals its solo run
        # the characters received when the utterance ended: all of them, or fewer when the (forced) stop came while
        # pieces were still arriving (the rest belongs to the stopped utterance and is not spoken, as in the solo run)
        assert 0 < got["done"]["usage"]["characters"] <= len(spec["text"])
    assert after["live_sessions"] == 0 and after["live_rows"] == 0
    server_ttfa = [r["done"]["usage"]["time_to_first_audio_s"] for r in results]
    client_ttfa = [r["client_ttfa"] for r in results]
    print(f"\n[load] {SESSIONS} sessions, arrivals over {max(r['arrived'] for r in results):.2f} s, "
          f"{FORCED_FRAMES} frames each, all done in {wall:.2f} s")
    print(f"[load] time to first audio (server usage): p50 {pct(server_ttfa, 50):.3f} s, "
          f"p95 {pct(server_ttfa, 95):.3f} s")
    print(f"[load] time to first audio (client, first input.text sent -> first frame read): "
          f"p50 {pct(client_ttfa, 50):.3f} s, p95 {pct(client_ttfa, 95):.3f} s")
    print(f"[load] server RSS: before {rss.before:.1f} MB, peak {rss.peak:.1f} MB, after {rss.after:.1f} MB")


def test_clients_that_leave_mid_stream_free_their_rows(server, pipe):
    idle(server)

    async def run():
        leaving = []
        for i, how in enumerate(["text pending", "speaking, nothing read", "after the first frame"]):
            ws = await open_session(server, 50 + i)
            await send(ws, type="input.text", text="I will leave before the end of this")
            if how != "text pending":
                await send(ws, type="input.done")
            if how == "after the first frame":
                assert isinstance(await asyncio.wait_for(ws.recv(), 60), bytes)
            leaving.append(ws)
        await asyncio.to_thread(wait_health, server, lambda h: h["live_sessions"] == 3)
        for ws in leaving:
            ws.transport.abort()  # no close frame: the connection just drops
        await asyncio.to_thread(idle, server)
        ws = await open_session(server, 60)
        await send(ws, type="input.text", text="The next one.")
        await send(ws, type="session.close")
        audio, _, _ = await utterance(ws, timeout=60)
        await ws.close()
        return audio

    audio = asyncio.run(asyncio.wait_for(run(), 180))
    assert audio == reference(pipe, "The next one.", 60)
    idle(server)


def test_a_slow_reader_keeps_memory_bounded_and_completes_when_it_reads(server, pipe):
    idle(server)
    n = 6
    texts = [f"Utterance number {i} for a slow reader." for i in range(n)]

    async def run():
        # A small receive queue: the client stops reading its socket, so the server's sends really wait.
        slow = await open_session(server, 70, max_queue=2)
        async with RSS(server) as rss:
            for text in texts:
                await send(slow, type="input.text", text=text)
                await send(slow, type="input.done")
            # The slow session holds no one up: another session is served meanwhile.
            other = await open_session(server, 71)
            await send(other, type="input.text", text="Served meanwhile.")
            await send(other, type="session.close")
            other_audio, _, _ = await utterance(other, timeout=60)
            await other.close()
            await asyncio.sleep(3.0)  # still reading nothing
            stalled = rss.peak
            got = [await utterance(slow) for _ in texts]
        await send(slow, type="session.close")
        rest, code = await closing(slow)
        return other_audio, got, rest, code, rss, stalled

    other_audio, got, rest, code, rss, stalled = asyncio.run(asyncio.wait_for(run(), 240))
    assert other_audio == reference(pipe, "Served meanwhile.", 71)
    assert code == 1000 and rest == []
    for text, (audio, done, _) in zip(texts, got):  # input.done keeps the seed: each utterance on seed 70
        assert audio == reference(pipe, text, 70)
    print(f"\n[load] slow reader: {n} utterances of {FORCED_FRAMES} frames unread for 3 s; server RSS before "
          f"{rss.before:.1f} MB, peak while stalled {stalled:.1f} MB, after {rss.after:.1f} MB")
    # Bounded: at most one utterance of audio (a few hundred kB) waits for the reader; allow for allocator noise.
    assert rss.peak - rss.before < 150, (rss.before, rss.peak)
    idle(server)


def test_a_session_idle_past_the_timeout_gets_idle_timeout_and_a_clean_close(server):
    idle(server)

    async def run():
        ws = await open_session(server, 80)
        await send(ws, type="input.text", text="Pending")  # fewer ids than a window: nothing is spoken
        start = time.monotonic()
        messages, code = await closing(ws, timeout=IDLE_S + 30)
        return messages, code, time.monotonic() - start

    received, code, waited = asyncio.run(run())
    assert [m["code"] for m in received] == ["idle_timeout"] and received[0]["type"] == "error"
    assert code == 1000 and IDLE_S - 0.5 < waited < IDLE_S + 15, waited
    idle(server)  # its pending row is gone too


def test_sigterm_during_streaming_drains_then_closes_1001_and_exits(pipe, tmp_path):
    server = start(tmp_path, "--ws-idle-timeout", "30", "--grace", "10")
    try:
        async def run():
            flushed = await open_session(server, 90)
            await send(flushed, type="input.text", text="Finish this one.")
            await send(flushed, type="input.done")
            assert isinstance(await asyncio.wait_for(flushed.recv(), 60), bytes)  # streaming now
            pending = await open_session(server, 91)
            await send(pending, type="input.text", text="Not flushed yet")  # drain flushes it
            await asyncio.to_thread(wait_health, server, lambda h: h["live_sessions"] == 2)
            server.terminate()
            first, _, _ = await utterance(flushed)
            second, _, _ = await utterance(pending)
            ends = [await closing(flushed), await closing(pending)]
            return first, second, ends

        first, second, ends = asyncio.run(asyncio.wait_for(run(), 120))
        code = server.proc.wait(30)
    finally:
        server.stop()
    assert len(first) == FORCED_FRAMES * FRAME_BYTES - FRAME_BYTES  # the rest after the frame read before SIGTERM
    assert second == reference(pipe, "Not flushed yet", 91)
    for messages, close in ends:
        assert close == 1001 and all(m["code"] == "shutting_down" for m in messages), (messages, close)
    # uvicorn re-raises the signal once it has shut down cleanly: the exit status is the signal's (as for the
    # HTTP routes in test_server_faults.py).
    assert code in (0, -signal.SIGTERM) and "Finished server process" in server.log(), server.log()[-2000:]
