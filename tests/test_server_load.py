"""Load: 16 concurrent clients on the tiny model, twice. Every request is answered (audio, or a clean 503 when
the queue is full), none is lost, none gets another's audio, and memory returns to where it was."""

import logging
import statistics
import threading
import time

import numpy as np
import pytest

import server_helpers as sh

logger = logging.getLogger(__name__)

CLIENTS = 16
FRAMES = 6
SCRIPT = "Speaker 1: Load test."


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    return sh.shared_server(tiny, tmp_path_factory)


@pytest.fixture(scope="module")
def references(tiny, tmp_path_factory):
    pipe = sh.pipe(tiny, tmp_path_factory.mktemp("load"))
    assert pipe.hop_length == sh.HOP
    return {seed: sh.reference_pcm(pipe, SCRIPT, seed, FRAMES) for seed in range(100, 100 + CLIENTS)}


def one_round(server):
    """All clients at once (released together by a barrier); returns [(seed, response or exception, seconds)]."""
    results = [None] * CLIENTS
    barrier = threading.Barrier(CLIENTS)

    def client(i):
        seed = 100 + i
        barrier.wait(10)
        start = time.monotonic()
        try:
            r = server.speech(input=SCRIPT, response_format="pcm", seed=seed, max_seconds=sh.seconds_for(FRAMES),
                              timeout=60)
        except Exception as e:  # noqa: BLE001 - reported by the test as a lost request
            r = e
        results[i] = (seed, r, time.monotonic() - start)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    wall = time.monotonic() - started
    assert not any(t.is_alive() for t in threads), "a client got no answer in 90 s"
    return results, wall


def check_round(results, references):
    ok = 0
    for seed, r, _ in results:
        assert not isinstance(r, Exception), f"seed {seed}: request lost: {r!r}"
        if r.status == 503:
            assert r.error["code"] == "queue_full" and int(r.headers["retry-after"]) >= 1
            continue
        assert r.status == 200, r.body[:300]
        got = np.frombuffer(r.body, "<i2").astype(np.int32)
        distances = {s: np.abs(got - ref).max() if len(ref) == len(got) else np.inf for s, ref in references.items()}
        # Its own seed's audio, and no other's: a mixed-up stream would be nearer another seed (or no seed).
        assert min(distances, key=distances.get) == seed and distances[seed] <= 2, (seed, sorted(distances.items()))
        ok += 1
    return ok


def test_sixteen_concurrent_clients(server, references):
    server.wait_idle()
    warm, _ = one_round(server)  # compiles what this batch mix needs; memory after it is the baseline
    check_round(warm, references)
    server.wait_idle()
    baseline = server.rss_mb()
    before = server.health()
    results, wall = one_round(server)
    answered_ok = check_round(results, references)
    after = server.wait_idle()
    rss = server.rss_mb()

    accepted = after["completed"] - before["completed"]
    rejected = after["rejected"] - before["rejected"]
    assert accepted == answered_ok and accepted + rejected == CLIENTS  # none lost, none answered twice
    assert answered_ok >= after["max_batch"]  # the queue lets at least one full batch through
    assert after["batches"] - before["batches"] < accepted  # requests that came together ran together
    assert rss < baseline + 40, (baseline, rss)

    latencies = sorted(t for _, r, t in results if getattr(r, "status", None) == 200)
    logger.info("load: %d clients, %d answered with audio, %d with 503, %.2f s wall, %.1f requests/s; latency "
                   "p50 %.2f s, p95 %.2f s, max %.2f s; %d batches; RSS %.0f -> %.0f MB", CLIENTS, answered_ok,
                   rejected, wall, answered_ok / wall, statistics.median(latencies),
                   latencies[int(0.95 * (len(latencies) - 1))], latencies[-1], after["batches"] - before["batches"],
                   baseline, rss)
