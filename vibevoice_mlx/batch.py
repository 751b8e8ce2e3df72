"""`vibevoice-mlx batch`: the jobs of a manifest (batch_jobs.py), several per forward pass, resumable, spread over
processes and machines without a scheduler of ours.

One process runs its jobs through `generate_batch` (`--batch-size` scripts per forward pass; batch_run.py).
`--shard i/n` keeps every n-th job, so any launcher can start n copies; under `mlx.launch` each process takes its
share by its `mx.distributed` rank (no collectives: the ranks never talk). `--ray` hands the jobs to Ray Data
(batch_ray.py), whose workers run the same `Runner`. Every job is checked against its output folder before it
runs, so a rerun, a retried Ray task or a second shard never makes a finished job again.
"""

import os
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import click

from .batch_jobs import Job, is_finished, log_event, parse_shard, prepare, read_manifest
from .batch_run import BUSY, DONE, FAILED, MAX_BATCH, SKIPPED, Outcome, Runner
from .checkpoint import model_identity
from .errors import CLIError, UserError, user_errors
from .models import REALTIME
from .preflight import is_realtime


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


def writable_folder(out_dir: Path) -> None:
    """--out-dir made if missing and writable, or one line saying why not (before any job is looked at)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"Cannot create --out-dir {out_dir}: {e.strerror or e}; choose another folder.") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise UserError(f"--out-dir {out_dir} is not writable: choose another folder.")


def summary(outcomes: Sequence[Outcome], wall: float) -> str:
    counts = {s: sum(o.status == s for o in outcomes) for s in (DONE, SKIPPED, FAILED, BUSY)}
    audio = sum(o.audio_seconds for o in outcomes if o.status == DONE)
    speed = f"{audio / wall:.2f}x real time" if wall > 0 else "-"
    busy = f", {counts[BUSY]} being made by another run" if counts[BUSY] else ""
    return (f"{counts[DONE]} done, {counts[SKIPPED]} skipped, {counts[FAILED]} failed{busy}; "
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
@click.option("--batch-invariant", is_flag=True,
              help="Each job's audio equals its run alone, bit for bit on any BLAS (one product per script: "
                   "slower with several scripts on the CPU).")
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
def batch(ctx, manifest, out_dir, model, dtype, tokenizer, batch_size, batch_invariant, shard, ray_address, workers,
          worker_cpus, retries, force_frames, **defaults):
    """Generate every job of MANIFEST (JSON Lines) into --out-dir; finished jobs are skipped, so a rerun resumes."""
    quiet = (ctx.obj or {}).get("quiet", False)
    started = time.perf_counter()
    with user_errors():
        realtime = is_realtime(model)
        if realtime and any(defaults.get(k) is not None for k in ("temperature", "top_p")):
            raise UserError("--temperature and --top-p only apply to VibeVoice 1.5B/7B, not to "
                            "VibeVoice-Realtime-0.5B (it chooses no tokens): leave them out.")
        jobs = read_manifest(manifest, defaults, realtime=realtime)
        shard_spec = parse_shard(shard) if shard is not None else None
        rank = launched_rank()
        writable_folder(out_dir)
    mine = select(jobs, shard_spec, rank)
    where = (f"shard {shard} " if shard else "") + (f"rank {rank[0]}/{rank[1]} " if rank[1] > 1 else "")
    if not quiet:
        click.echo(f"{where}{len(mine)} of {len(jobs)} jobs from {manifest}", err=True)
    run = {"model": model_identity(model), "dtype": dtype, "force_frames": force_frames}  # not the path's spelling
    if realtime:
        run["family"] = REALTIME  # jobs' voices are presets
    todo, outcomes = plan(mine, out_dir, run)
    for o in outcomes:
        _report(o, quiet)
    if todo:
        if ray_address is not None:
            from .batch_ray import run_on_ray

            source = run_on_ray(todo, out_dir, ray_address or None, workers=workers, worker_cpus=worker_cpus,
                                retries=retries, batch_size=batch_size, model=model, dtype=dtype,
                                tokenizer=tokenizer, force_frames=force_frames, batch_invariant=batch_invariant)
        else:
            source = Runner(out_dir, model, dtype=dtype, tokenizer=tokenizer, batch_size=batch_size,
                            force_frames=force_frames, batch_invariant=batch_invariant).run(todo)
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
        extra = f" ({o.audio_seconds:.1f} s{', cut short' if o.truncated else ''})" if o.status == DONE else \
            f" ({o.message})" if o.message else ""
        click.echo(f"{o.status:<7} {o.id} -> {o.output}{extra}", err=True)
