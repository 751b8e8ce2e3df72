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

import websockets  # noqa: E402  (the server extra, which the test extra includes)
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
