"""Running jobs of `vibevoice-mlx batch` in one process: the model loaded once, jobs with the same steps and cfg
scale through `generate_batch` together, each output written as soon as its batch is done. The command
(batch.py) and the Ray workers (batch_ray.py) both run their jobs through `Runner`.
"""

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from .batch_jobs import Job, claim, is_finished, log_event, release, write_outputs
from .errors import UserError
from .models import REALTIME

logger = logging.getLogger(__name__)

DONE, SKIPPED, FAILED, BUSY = "done", "skipped", "failed", "busy"  # busy: another run is making it
MAX_BATCH = 8  # scripts per forward pass at most by default: past that a step's cost grows about linearly


@dataclass
class Outcome:
    """What became of one job."""

    id: str
    status: str
    output: str
    message: str = ""
    audio_seconds: float = 0.0
    truncated: bool = False


def forced_frames(frames: int):
    """Testing aid (random test models rarely choose speech on their own): per segment, `frames` speech frames,
    then speech_end and eos."""
    state = {"i": 0}

    def choose(logits, token_ids):
        speech_start, speech_end, speech_diffusion, eos = token_ids
        i = state["i"] % (frames + 2)
        state["i"] += 1
        return speech_diffusion if i < frames else (speech_end if i == frames else eos)

    return choose


def default_batch_size(pipe, memory_bytes: Optional[int] = None, cap: int = MAX_BATCH) -> int:
    """Scripts per forward pass that fit this machine: half of the memory the weights leave (less 2 GB) over one
    script's key/value caches (both guidance branches, up to 8192 positions), between 1 and `cap`."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from .doctor import system_memory_bytes

    memory = memory_bytes if memory_bytes is not None else system_memory_bytes()
    if memory is None:
        return min(4, cap)
    lm = pipe.config.decoder_config
    head_dim = lm.hidden_size // lm.num_attention_heads
    itemsize = mx.zeros((), pipe.backend.dtype).itemsize
    per_row = 2 * lm.num_hidden_layers * 2 * lm.num_key_value_heads * head_dim * itemsize * \
        min(pipe.config.max_positions, 8192)
    weights = sum(v.nbytes for _, v in tree_flatten(pipe.model.parameters()))
    spare = (memory - weights - 2 * 2**30) // 2
    return int(max(1, min(cap, spare // per_row)))


class Runner:
    """Loads the model once, on first use, and runs prepared jobs batch by batch into `out_dir`."""

    def __init__(self, out_dir, model: str, dtype: Optional[str] = None, tokenizer: Optional[str] = None,
                 batch_size: Optional[int] = None, force_frames: Optional[int] = None, batch_invariant: bool = False):
        self.out_dir = Path(out_dir)
        self.model, self.dtype, self.tokenizer = model, dtype, tokenizer
        self.batch_size, self.force_frames, self.batch_invariant = batch_size, force_frames, batch_invariant
        self._pipe = None

    @property
    def pipe(self):
        if self._pipe is None:
            from .convert.cache import model_folder
            from .loader import load

            folder = model_folder(self.model, dtype=self.dtype, tokenizer=self.tokenizer)
            self._pipe = load(folder, dtype=self.dtype, tokenizer=self.tokenizer,
                              max_batch=self.batch_size or MAX_BATCH, batch_invariant=self.batch_invariant)
            if self.batch_size is None and self.realtime:
                self.batch_size = self._pipe.max_batch
            elif self.batch_size is None:
                self.batch_size = self._pipe.backend.max_batch = default_batch_size(self._pipe)
                logger.info("Batch size %d (from this machine's memory; --batch-size sets it)", self.batch_size)
        return self._pipe

    @property
    def realtime(self) -> bool:
        return getattr(self.pipe, "family", None) == REALTIME

    def run(self, jobs: Sequence[Job]) -> Iterator[Outcome]:
        """Jobs with the same steps and cfg scale (a batch shares them) are generated together, in order."""
        groups: Dict[Tuple, List[Job]] = {}
        for job in jobs:
            groups.setdefault((job.options.get("steps"), job.options.get("cfg_scale")), []).append(job)
        if self.batch_size is None:
            self.pipe  # noqa: B018 - loading the model picks the batch size from memory
        for group in groups.values():
            for k in range(0, len(group), self.batch_size):
                yield from self._run_batch(group[k:k + self.batch_size])

    def _run_batch(self, jobs: List[Job]) -> Iterator[Outcome]:
        """Claim the jobs nobody has finished or is making (a retried Ray task, or another process on the same
        folder, may have), make them, give the claims back."""
        todo, held = [], []
        try:
            for job in jobs:
                if is_finished(self.out_dir, job):
                    yield self._skipped(job)
                    continue
                fd = claim(self.out_dir, job)
                if fd is None:
                    log_event(self.out_dir, BUSY, id=job.id)
                    yield Outcome(job.id, BUSY, job.output, message="another run is making it")
                    continue
                held.append((job, fd))
                if is_finished(self.out_dir, job):  # the other run finished it just before our claim
                    yield self._skipped(job)
                else:
                    todo.append(job)
            if todo:
                yield from self._make(todo)
        finally:
            for job, fd in held:
                release(self.out_dir, job, fd)

    def _skipped(self, job: Job) -> Outcome:
        log_event(self.out_dir, SKIPPED, id=job.id)
        return Outcome(job.id, SKIPPED, job.output)

    def _make(self, todo: List[Job]) -> Iterator[Outcome]:
        log_event(self.out_dir, "start", ids=[j.id for j in todo])
        started = time.time()
        try:
            results = self._generate(todo)
        except Exception as e:  # noqa: BLE001 - one bad job must not stop the others: find it
            if len(todo) > 1:
                logger.info("A batch of %d failed (%s); running its jobs one by one", len(todo), e)
                for job in todo:
                    yield from self._make([job])
                return
            yield self._failed(todo[0], e)
            return
        for job, r in zip(todo, results):
            if r.audio.size == 0:
                yield self._failed(job, UserError("The model produced no audio for this script; try another seed "
                                                  "or a voice sample."))
                continue
            record = {"result": {"audio_seconds": r.audio_seconds, "frames": r.frames, "truncated": r.truncated,
                                 "sample_rate": r.sample_rate, "real_time_factor": r.real_time_factor,
                                 "peak_memory_gb": r.peak_memory_gb},
                      "generation": self._actual(job),
                      "timings": {"started": _iso(started), "finished": _iso(time.time()), "elapsed_s": r.elapsed,
                                  "batch_size": len(todo)}}
            try:
                write_outputs(self.out_dir, job, r.audio, r.sample_rate, record)
            except (OSError, UserError) as e:
                yield self._failed(job, e)
                continue
            log_event(self.out_dir, DONE, id=job.id, audio_seconds=r.audio_seconds)
            yield Outcome(job.id, DONE, job.output, audio_seconds=r.audio_seconds, truncated=r.truncated)

    def _generate(self, jobs: List[Job]):
        from .generation import GenerationConfig, generate_batch

        pipe, base = self.pipe, GenerationConfig()
        shared = {k: jobs[0].options[k] for k in ("steps", "cfg_scale") if jobs[0].options.get(k) is not None}
        per_script = {k: [j.options.get(k, getattr(base, k)) for j in jobs]
                      for k in ("temperature", "top_p", "max_seconds")}
        forced = {}
        if self.force_frames and self.realtime:  # `frames` frames, then the stop
            forced["eos_rule"] = lambda frame, probability, n=self.force_frames: frame >= n - 1
        elif self.force_frames:
            forced["sampler"] = [forced_frames(self.force_frames) for _ in jobs]
        return generate_batch(pipe, [j.script for j in jobs], [j.voices or None for j in jobs],
                              seed=[j.seed for j in jobs], **forced, **per_script, **shared)

    def _actual(self, job: Job) -> Dict:
        from .generation import GenerationConfig

        base = GenerationConfig(**self.pipe.defaults)
        return {k: job.options.get(k, getattr(base, k)) for k in ("steps", "cfg_scale")}

    def _failed(self, job: Job, error: Exception) -> Outcome:
        message = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
        if not isinstance(error, (UserError, OSError)):
            logger.debug("Job %s failed", job.id, exc_info=error)
        log_event(self.out_dir, FAILED, id=job.id, message=message)
        return Outcome(job.id, FAILED, job.output, message=message)


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"
