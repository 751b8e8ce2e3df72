"""The server's parts without a model: streaming encoders, voice names, and the worker's queue, batching,
cancellation and failure isolation over a fake `stream_generate_batch`."""

import io
import struct
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

from vibevoice_mlx.server import encode
from vibevoice_mlx.server.voices import VoiceNameError, VoiceStore, check_name
from vibevoice_mlx.server.worker import Job, QueueFullError, ShuttingDownError, Worker

TONE = (0.5 * np.sin(np.arange(24000) / 7)).astype(np.float32)


def encode_all(fmt, chunk=3200):
    enc = encode.make_encoder(fmt)
    parts = [enc.write(TONE[i:i + chunk]) for i in range(0, len(TONE), chunk)]
    return parts, enc.close()


@pytest.mark.parametrize("fmt", ["wav", "mp3", "opus", "flac"])
def test_streamed_formats_are_one_readable_file(fmt):
    if not encode.available_formats()[fmt]:
        pytest.fail(f"libsndfile here cannot write {fmt}")
    parts, tail = encode_all(fmt)
    audio, sr = sf.read(io.BytesIO(b"".join(parts) + tail), dtype="float32")
    assert sr == 24000
    assert (24000 <= len(audio) <= 24000 + 2304) if fmt == "mp3" else len(audio) == 24000
    if fmt in ("wav", "mp3", "opus"):  # these really stream: bytes leave before the end
        assert sum(map(len, parts)) > 0
    else:  # flac is held back until its header can carry the length
        assert sum(map(len, parts)) == 0 and sf.info(io.BytesIO(tail)).frames == 24000


def test_wav_header_says_unknown_length_once():
    parts, tail = encode_all("wav")
    data = b"".join(parts) + tail
    assert data.count(b"RIFF") == 1 and struct.unpack("<I", data[4:8])[0] == 0xFFFFFFFF
    assert np.array_equal(np.frombuffer(data[44:], "<i2"), np.round(TONE * 32767).astype("<i2"))


def test_wav_not_streamed_has_its_true_sizes():
    import wave

    enc = encode.make_encoder("wav", stream=False)
    assert all(enc.write(TONE[i:i + 3200]) == b"" for i in range(0, len(TONE), 3200))
    data = enc.close()
    assert struct.unpack("<I", data[4:8])[0] == len(data) - 8 and struct.unpack("<I", data[40:44])[0] == 48000
    with wave.open(io.BytesIO(data)) as w:  # Python's reader takes the header's sizes as they are
        assert w.getnframes() == 24000 and w.getframerate() == 24000
        assert np.array_equal(np.frombuffer(w.readframes(24000), "<i2"), np.round(TONE * 32767).astype("<i2"))
    assert encode.make_encoder("wav", stream=False).close() == encode.wav_header(num_samples=0)


def test_pcm16_clips_and_rounds():
    got = np.frombuffer(encode.to_pcm16(np.array([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0], np.float32)), "<i2")
    assert got.tolist() == [-32767, -32767, 0, 16384, 32767, 32767]


def test_empty_wav_stream_is_still_a_file():
    enc = encode.make_encoder("wav")
    assert enc.close() == encode.wav_header() and enc.close() == b""


def test_sink_never_changes_bytes_already_sent():
    sink = encode._Sink()
    sink.write(b"header--")
    sink.write(b"data")
    assert sink.take() == b"header--data"
    sink.write(b"more")
    sink.seek(0)
    sink.write(b"HEADER")  # an encoder patching its header on close: too late, already sent
    sink.seek(0, 2)
    sink.write(b"!")
    assert sink.take() == b"more!" and sink.tell() == 17


@pytest.mark.parametrize("name", ["alice", "Bob_2", "a-b", "x" * 64, "7"])
def test_plain_voice_names_pass(name):
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", ".", "..", "../a", "a/b", "a\\b", ".hidden", "-a", "a.b", "x" * 65, "é", None])
def test_voice_names_with_tricks_are_refused(name):
    with pytest.raises(VoiceNameError):
        check_name(name)


def test_voice_store_hands_the_writer_a_safetensors_path(tmp_path):
    store = VoiceStore(tmp_path / "voices")
    seen = []
    store.add("x", lambda path: seen.append(path) or path.write_bytes(b"voice"))
    assert seen[0].suffix == ".safetensors" and seen[0].name.startswith(".upload-")
    assert store.path("x").read_bytes() == b"voice" and not seen[0].exists()


def test_voice_store_writes_whole_files_only(tmp_path):
    store = VoiceStore(tmp_path / "voices")
    (store.folder / ".upload-stale.wav").write_bytes(b"x")

    def failing(path):
        path.write_bytes(b"half")
        raise ValueError("encoding failed")

    with pytest.raises(ValueError):
        store.add("x", failing)
    assert store.names() == [] and [p.name for p in store.folder.iterdir()] == [".upload-stale.wav"]
    VoiceStore(store.folder)  # a restart clears what an interrupted upload left
    assert list(store.folder.iterdir()) == []


# --- the worker over a fake engine -------------------------------------------------------------------------


class FakeEngine:
    """Stands in for vv.stream_generate_batch: `frames` frames per script (audio = its seed; a script "long" has
    400), one script after another; a script "bad" raises at its start; `delay` seconds per frame."""

    def __init__(self, frames=3, delay=0.0):
        self.frames, self.delay, self.calls = frames, delay, []

    def __call__(self, pipe, scripts, voices=None, **options):
        self.calls.append((list(scripts), options))
        for i, script in enumerate(scripts):
            if script == "bad":
                raise ValueError(f"bad script at {i}")
            frames = 400 if script == "long" else self.frames
            for f in range(frames):
                time.sleep(self.delay)
                yield i, SimpleNamespace(audio=np.full(2, options["seed"][i], np.float32), frames=f + 1,
                                         audio_seconds=(f + 1) / 100, truncated=False, finished=f == frames - 1)
                if options["stop"][i]():
                    break


class Collect:
    def __init__(self):
        self.events, self.ended = [], threading.Event()

    def __call__(self, kind, payload):
        self.events.append((kind, payload))
        if kind != "audio":
            self.ended.set()

    @property
    def audio(self):
        return [p[0] for k, p in self.events if k == "audio"]

    @property
    def last(self):
        return self.events[-1]


def make_worker(engine, **kw):
    return Worker(lambda: "pipe", generate=engine, free_when_idle=False, **kw).start()


def job(seed, script="hi", **kw):
    sink = Collect()
    return Job(script=script, emit=sink, seed=seed, **kw), sink


def test_jobs_that_arrive_together_run_as_one_batch_with_their_own_options():
    engine = FakeEngine()
    worker = make_worker(engine, max_batch=4, batch_window=0.2)
    try:
        jobs = [job(seed) for seed in (1, 2, 3)]
        for j, _ in jobs:
            worker.submit(j)
        assert all(sink.ended.wait(5) for _, sink in jobs)
    finally:
        worker.stop()
    assert len(engine.calls) == 1 and engine.calls[0][1]["seed"] == [1, 2, 3]
    assert not {"steps", "cfg_scale"} & set(engine.calls[0][1])  # not asked for: the model's defaults
    for (j, sink), seed in zip(jobs, (1, 2, 3)):
        assert sink.audio == [seed] * 3 and sink.last[0] == "end" and sink.last[1]["frames"] == 3


def test_batches_group_by_steps_and_cfg_and_keep_the_order():
    engine = FakeEngine(frames=1, delay=0.01)
    worker = make_worker(engine, max_batch=8, batch_window=0.2)
    try:
        jobs = [job(i, steps=s) for i, s in enumerate((10, 20, 10, 20, 10))]
        for j, _ in jobs:
            worker.submit(j)
        assert all(sink.ended.wait(5) for _, sink in jobs)
    finally:
        worker.stop()
    assert [(c[1]["steps"], c[1]["seed"]) for c in engine.calls] == [(10, [0, 2, 4]), (20, [1, 3])]


def test_a_later_request_does_not_wait_for_a_long_one_but_max_batch_holds():
    long_engine = FakeEngine(frames=3, delay=0.002)
    worker = make_worker(long_engine, max_batch=2, batch_window=0)
    try:
        long_job, long_sink = job(1, script="long")
        worker.submit(long_job)
        deadline = time.monotonic() + 5
        while not long_sink.audio and time.monotonic() < deadline:
            time.sleep(0.005)
        short = [job(seed) for seed in (2, 3)]
        for j, _ in short:
            worker.submit(j)
        assert short[0][1].ended.wait(5) and short[1][1].ended.wait(5)
        assert not long_sink.ended.is_set(), long_sink.events[-1]  # the short ones ran while the long one went on
        assert worker.snapshot()["active"] == 1
    finally:
        worker.stop()
    # max_batch 2: the long job and one short one at a time, so the two short ones ran in separate batches.
    assert [c[1]["seed"] for c in long_engine.calls] == [[1], [2], [3]]


def test_a_full_queue_refuses_with_retry_after():
    engine = FakeEngine(frames=50, delay=0.01)
    worker = make_worker(engine, max_queue=2, max_batch=1, batch_window=0)
    try:
        running, _ = job(0)
        worker.submit(running)
        deadline = time.monotonic() + 5
        while worker.snapshot()["active"] == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        worker.submit(job(1)[0])
        worker.submit(job(2)[0])
        with pytest.raises(QueueFullError) as e:
            worker.submit(job(3)[0])
        assert e.value.status == 503 and int(e.value.headers["Retry-After"]) >= 1
        assert worker.snapshot()["rejected"] == 1
    finally:
        worker.stop()


def test_cancelled_jobs_stop_at_the_next_frame_or_never_start():
    engine = FakeEngine(frames=200, delay=0.005)
    worker = make_worker(engine, max_batch=1, batch_window=0)
    try:
        running, run_sink = job(1)
        waiting, wait_sink = job(2)
        worker.submit(running)
        worker.submit(waiting)
        deadline = time.monotonic() + 5
        while not run_sink.audio and time.monotonic() < deadline:
            time.sleep(0.005)
        worker.cancel(waiting)
        worker.cancel(running)
        assert run_sink.ended.wait(5)
    finally:
        worker.stop()
    assert run_sink.last[0] == "end" and run_sink.last[1]["stopped"] and len(run_sink.audio) < 200
    assert wait_sink.events == [] and [c[1]["seed"] for c in engine.calls] == [[1]]


def test_a_bad_script_fails_alone_and_its_batch_still_gets_audio():
    engine = FakeEngine()
    worker = make_worker(engine, max_batch=4, batch_window=0.2)
    try:
        jobs = [job(1), job(2, script="bad"), job(3)]
        for j, _ in jobs:
            worker.submit(j)
        assert all(sink.ended.wait(5) for _, sink in jobs)
        assert worker.snapshot()["failed"] == 1
    finally:
        worker.stop()
    (_, good1), (_, bad), (_, good2) = jobs
    assert good1.audio == [1] * 3 and good2.audio == [3] * 3
    assert bad.last[0] == "error" and bad.last[1].status == 400 and "bad script" in bad.last[1].message


def test_drain_refuses_queued_jobs_and_ends_running_ones_after_the_grace():
    engine = FakeEngine(frames=10_000, delay=0.002)
    worker = make_worker(engine, max_batch=1, batch_window=0)
    running, run_sink = job(1)
    waiting, wait_sink = job(2)
    worker.submit(running)
    worker.submit(waiting)
    deadline = time.monotonic() + 5
    while not run_sink.audio and time.monotonic() < deadline:
        time.sleep(0.005)
    start = time.monotonic()
    worker.drain(0.2)
    with pytest.raises(ShuttingDownError):
        worker.submit(job(3)[0])
    assert run_sink.ended.wait(5) and 0.15 < time.monotonic() - start < 3
    worker.stop()
    assert run_sink.last[0] == "end" and run_sink.last[1]["stopped"]
    assert wait_sink.last[0] == "error" and wait_sink.last[1].status == 503


def test_a_task_in_steps_runs_between_frames_and_does_not_hold_up_a_request():
    engine = FakeEngine(frames=5, delay=0.002)
    worker = make_worker(engine, max_batch=2, batch_window=0)
    steps_done = []

    def encoding(pipe):  # stands in for encoding a long voice upload, chunk by chunk
        for i in range(200):
            time.sleep(0.002)
            steps_done.append(i)
            yield
        return f"encoded with {pipe}"

    try:
        future = worker.call(encoding)
        deadline = time.monotonic() + 5
        while not steps_done and time.monotonic() < deadline:
            time.sleep(0.001)
        speech, sink = job(1)
        worker.submit(speech)
        assert sink.ended.wait(5) and sink.last[0] == "end" and sink.audio == [1] * 5
        assert not future.done() and len(steps_done) < 100  # the request ended while the encoding went on
        assert future.result(5) == "encoded with pipe" and len(steps_done) == 200
        failing = worker.call(lambda pipe: (x for x in [1, 2] if x / 0))
        with pytest.raises(ZeroDivisionError):
            failing.result(5)
    finally:
        worker.stop()


def test_a_task_with_slow_steps_takes_about_half_the_time_of_a_request():
    engine = FakeEngine(frames=30, delay=0.004)
    worker = make_worker(engine, batch_window=0)
    steps = []

    def encoding(pipe):  # each step costs five frames
        for i in range(1000):
            time.sleep(0.02)
            steps.append(time.monotonic())
            yield

    try:
        future = worker.call(encoding)
        deadline = time.monotonic() + 5
        while len(steps) < 25 and time.monotonic() < deadline:  # alone, it takes the whole thread, owing nothing
            time.sleep(0.001)
        speech, sink = job(1)
        worker.submit(speech)
        start = time.monotonic()
        assert sink.ended.wait(10) and sink.audio == [1] * 30
        during = sum(start <= t <= time.monotonic() for t in steps)
    finally:
        future.cancel()
        worker.stop()
    # Half the time: 30 frames of 4 ms buy about 6 steps of 20 ms; one step per frame would be 30.
    assert 4 <= during <= 15, during


def test_a_model_that_fails_to_load_fails_start():
    def load():
        raise ValueError("no config.json")

    with pytest.raises(ValueError, match="config.json"):
        Worker(load).start()


def test_serve_with_a_bad_model_is_a_one_line_error(tmp_path):
    from click.testing import CliRunner

    from vibevoice_mlx.server.cli import serve

    result = CliRunner().invoke(serve, ["--model", str(tmp_path), "--voices-dir", str(tmp_path / "v")])
    assert result.exit_code == 1 and "No config.json" in result.output and "Traceback" not in result.output


# --- serve's checks before the model loads ------------------------------------------------------------------


def run_serve(*args):
    """serve with a folder that is no model: an error about anything else was found before loading."""
    from click.testing import CliRunner

    from vibevoice_mlx.server.cli import serve

    return CliRunner().invoke(serve, ["--model", "not-a-model-folder", *args])


@pytest.mark.parametrize("option", ["--max-upload-mb", "--grace"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_serve_refuses_options_that_are_not_finite(tmp_path, option, value):
    result = run_serve("--voices-dir", str(tmp_path), option, value)
    assert result.exit_code == 2 and f"'{option}'" in result.output and "finite" in result.output, result.output


def test_serve_refuses_a_port_in_use_before_loading(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_serve("--voices-dir", str(tmp_path), "--port", str(port))
    assert result.exit_code == 1 and f"127.0.0.1:{port}" in result.output and "--port" in result.output
    assert "config.json" not in result.output and "Traceback" not in result.output


def test_serve_refuses_a_voices_dir_it_cannot_write_before_loading(tmp_path, monkeypatch):
    import errno
    import os
    import tempfile

    voices = tmp_path / "voices"
    voices.mkdir()
    voices.chmod(0o555)
    if os.geteuid() == 0:  # root writes through mode bits: what stops it is a read-only mount, as here
        def read_only(*args, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))

        monkeypatch.setattr(tempfile, "mkstemp", read_only)
    result = run_serve("--voices-dir", str(voices))
    voices.chmod(0o755)
    said = result.output.lower()
    assert result.exit_code == 1 and "--voices-dir" in said and ("read-only" in said or "permission" in said), said
    assert "config.json" not in result.output and "Traceback" not in result.output
