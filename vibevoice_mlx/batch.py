"""`vibevoice-mlx batch`: the jobs of a manifest (batch_jobs.py), several per forward pass, resumable, spread over
processes and machines without a scheduler of ours.

One process runs its jobs through `generate_batch` (`--batch-size` scripts per forward pass). `--shard i/n` keeps
every n-th job, so any launcher can start n copies; under `mlx.launch` each process takes its share by its
`mx.distributed` rank (no collectives: the ranks never talk). `--ray` hands the jobs to Ray Data (batch_ray.py),
whose workers run the same `Runner`. Every job is checked against its output folder before it runs, so a rerun, a
retried Ray task or a second shard never makes a finished job again.
"""

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import click

from .batch_jobs import Job, is_finished, log_event, parse_shard, prepare, read_manifest, write_outputs
from .errors import CLIError, UserError, user_errors

logger = logging.getLogger(__name__)

DONE, SKIPPED, FAILED = "done", "skipped", "failed"
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
                 batch_size: Optional[int] = None, force_frames: Optional[int] = None):
        self.out_dir = Path(out_dir)
        self.model, self.dtype, self.tokenizer = model, dtype, tokenizer
        self.batch_size, self.force_frames = batch_size, force_frames
        self._pipe = None

    @property
    def pipe(self):
        if self._pipe is None:
            from .convert.cache import model_folder
            from .loader import load

            folder = model_folder(self.model, dtype=self.dtype, tokenizer=self.tokenizer)
            self._pipe = load(folder, dtype=self.dtype, tokenizer=self.tokenizer,
                              max_batch=self.batch_size or MAX_BATCH)
            if self.batch_size is None:
                self.batch_size = self._pipe.backend.max_batch = default_batch_size(self._pipe)
                logger.info("Batch size %d (from this machine's memory; --batch-size sets it)", self.batch_size)
        return self._pipe

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
        todo = []
        for job in jobs:  # a retried Ray task, or another process, may have finished some meanwhile
            if is_finished(self.out_dir, job):
                log_event(self.out_dir, SKIPPED, id=job.id)
                yield Outcome(job.id, SKIPPED, job.output)
            else:
                todo.append(job)
        if not todo:
            return
        log_event(self.out_dir, "start", ids=[j.id for j in todo])
        started = time.time()
        try:
            results = self._generate(todo)
        except Exception as e:  # noqa: BLE001 - one bad job must not stop the others: find it
            if len(todo) > 1:
                logger.info("A batch of %d failed (%s); running its jobs one by one", len(todo), e)
                for job in todo:
                    yield from self._run_batch([job])
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
        sampler = [forced_frames(self.force_frames) for _ in jobs] if self.force_frames else None
        return generate_batch(pipe, [j.script for j in jobs], [j.voices or None for j in jobs],
                              seed=[j.seed for j in jobs], sampler=sampler, **per_script, **shared)

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


def launched_rank() -> Tuple[int, int]:
    """(rank, size) under `mlx.launch` (or mpirun), else (0, 1). The group is started only when a launcher set
    the process up, and strictly: a rank that cannot join must not run every job by itself."""
    if not any(k in os.environ for k in ("MLX_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")):
        return 0, 1
    import mlx.core as mx

    try:
        group = mx.distributed.init(strict=True)
    except RuntimeError as e:
        raise UserError(f"Started by a launcher (MLX_RANK is set) but the distributed group did not start: {e}")
    return group.rank(), group.size()


def select(jobs: List[Job], shard: Optional[Tuple[int, int]], rank: Tuple[int, int]) -> List[Job]:
    """This process's jobs: every n-th of the manifest for --shard i/n, then every size-th for its rank."""
    if shard is not None:
        jobs = jobs[shard[0]::shard[1]]
    return jobs[rank[0]::rank[1]]


def plan(jobs: List[Job], out_dir: Path, run: Dict) -> Tuple[List[Job], List[Outcome]]:
    """Read and check each job's inputs and drop the finished ones: (jobs to run, outcomes already known)."""
    todo, known = [], []
    for job in jobs:
        try:
            prepare(job, run)
        except UserError as e:
            log_event(out_dir, FAILED, id=job.id, message=str(e))
            known.append(Outcome(job.id, FAILED, job.output, message=str(e)))
            continue
        if is_finished(out_dir, job):
            log_event(out_dir, SKIPPED, id=job.id)
            known.append(Outcome(job.id, SKIPPED, job.output))
        else:
            todo.append(job)
    return todo, known


def summary(outcomes: Sequence[Outcome], wall: float) -> str:
    counts = {s: sum(o.status == s for o in outcomes) for s in (DONE, SKIPPED, FAILED)}
    audio = sum(o.audio_seconds for o in outcomes if o.status == DONE)
    speed = f"{audio / wall:.2f}x real time" if wall > 0 else "-"
    return (f"{counts[DONE]} done, {counts[SKIPPED]} skipped, {counts[FAILED]} failed; "
            f"{audio / 3600:.2f} h of audio ({audio:.1f} s) in {wall:.1f} s, {speed}")


@click.command()
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--out-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the outputs, their sidecar .json files and batch-log.jsonl (created if missing).")
@click.option("-m", "--model", default="microsoft/VibeVoice-1.5B", show_default=True,
              help="Converted MLX folder, PyTorch checkpoint folder, or Hugging Face repo id.")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]),
              help="Compute dtype (default: float16 on a GPU, float32 on the CPU).")
@click.option("--tokenizer", help="Tokenizer folder or repo id, when the model folder has none.")
@click.option("--batch-size", type=click.IntRange(1),
              help=f"Scripts per forward pass (default: what memory allows, at most {MAX_BATCH}).")
@click.option("--shard", help="i/n: run only jobs i, i+n, i+2n, ... of the manifest (0 <= i < n).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
              help="Run the jobs on a Ray cluster (pip install 'vibevoice-mlx[ray]'): its ADDRESS, or none for the "
                   "one `ray start` runs here (else a local one).")
@click.option("--workers", type=click.IntRange(1),
              help="Ray: model workers (default: one per 'mlx' resource or GPU of the cluster, else 1).")
@click.option("--worker-cpus", default=1.0, show_default=True, type=click.FloatRange(0),
              help="Ray: CPUs each worker asks for.")
@click.option("--retries", default=3, show_default=True, type=click.IntRange(0),
              help="Ray: times a batch is retried after its worker died.")
@click.option("--seed", type=click.IntRange(0), help="Seed of jobs without one (default: derived from each id).")
@click.option("--steps", type=click.IntRange(1, 100), help="Diffusion steps of jobs without 'steps'.")
@click.option("--cfg-scale", type=float, help="Guidance scale of jobs without 'cfg_scale'.")
@click.option("--temperature", type=click.FloatRange(0), help="Of jobs without 'temperature' (default 0: greedy).")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), help="Of jobs without 'top_p'.")
@click.option("--max-seconds", type=click.FloatRange(0, min_open=True), help="Of jobs without 'max_seconds'.")
@click.option("--force-frames", type=click.IntRange(1), hidden=True,
              help="Testing aid: N speech frames per segment, then its end (random test models never speak).")
@click.pass_context
def batch(ctx, manifest, out_dir, model, dtype, tokenizer, batch_size, shard, ray_address, workers, worker_cpus,
          retries, force_frames, **defaults):
    """Generate every job of MANIFEST (JSON Lines) into --out-dir; finished jobs are skipped, so a rerun resumes."""
    quiet = (ctx.obj or {}).get("quiet", False)
    started = time.perf_counter()
    with user_errors():
        jobs = read_manifest(manifest, defaults)
        shard_spec = parse_shard(shard) if shard is not None else None
        rank = launched_rank()
    out_dir.mkdir(parents=True, exist_ok=True)
    mine = select(jobs, shard_spec, rank)
    where = (f"shard {shard} " if shard else "") + (f"rank {rank[0]}/{rank[1]} " if rank[1] > 1 else "")
    if not quiet:
        click.echo(f"{where}{len(mine)} of {len(jobs)} jobs from {manifest}", err=True)
    run = {"model": model, "dtype": dtype, "force_frames": force_frames}
    todo, outcomes = plan(mine, out_dir, run)
    for o in outcomes:
        _report(o, quiet)
    if todo:
        if ray_address is not None:
            from .batch_ray import run_on_ray

            source = run_on_ray(todo, out_dir, ray_address or None, workers=workers, worker_cpus=worker_cpus,
                                retries=retries, batch_size=batch_size, model=model, dtype=dtype,
                                tokenizer=tokenizer, force_frames=force_frames)
        else:
            source = Runner(out_dir, model, dtype=dtype, tokenizer=tokenizer, batch_size=batch_size,
                            force_frames=force_frames).run(todo)
        with user_errors():
            for o in source:
                outcomes.append(o)
                _report(o, quiet)
    if not quiet:
        click.echo(f"{where}{summary(outcomes, time.perf_counter() - started)}", err=True)
    failed = [o for o in outcomes if o.status == FAILED]
    if failed:
        raise CLIError(f"{len(failed)} job(s) failed: {', '.join(o.id for o in failed[:5])}"
                                   f"{' ...' if len(failed) > 5 else ''}; fix them and run again (finished jobs "
                                   "are skipped).")


def _report(o: Outcome, quiet: bool) -> None:
    if o.status == FAILED:
        click.echo(f"failed  {o.id}: {o.message}", err=True)
    elif not quiet:
        extra = f" ({o.audio_seconds:.1f} s{', cut short' if o.truncated else ''})" if o.status == DONE else ""
        click.echo(f"{o.status:<7} {o.id} -> {o.output}{extra}", err=True)
