"""`vibevoice-mlx batch --ray`: the jobs through Ray Data, `map_batches` over a stateful worker class, so each
worker (a Ray actor) loads the model once and runs batch_run.Runner on the rows it is given.

Workers: one per `mlx` custom resource of the cluster (`ray start --resources='{"mlx": 2}'` declares two slots on
a Mac; Apple GPUs are no Ray resource type), else one per GPU, else `--workers` (default 1) asking for
`--worker-cpus` each. A worker that dies is restarted and its batch retried (`--retries`); the retried batch
skips what the dead worker had finished, so nothing is made twice. Outputs go to `--out-dir`, which with several
machines must be a path every node sees (the voices and model too).
"""

import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Iterator, List, Optional

from .batch_run import MAX_BATCH, Outcome, Runner
from .batch_jobs import Job
from .errors import UserError

logger = logging.getLogger(__name__)


class BatchWorker:
    """One model per Ray actor; called with a batch of rows {"job": <Job as JSON>}."""

    def __init__(self, out_dir: str, model: str, dtype: Optional[str], tokenizer: Optional[str],
                 batch_size: Optional[int], force_frames: Optional[int], batch_invariant: bool = False):
        if "mlx.core" not in sys.modules:  # a Ray worker is no `vibevoice-mlx` process: set its BLAS up here
            from .blas import use_fast_blas

            use_fast_blas()
        self.runner = Runner(out_dir, model, dtype=dtype, tokenizer=tokenizer, batch_size=batch_size,
                             force_frames=force_frames, batch_invariant=batch_invariant)
        self.runner.pipe  # noqa: B018 - load now, once per actor, not on its first batch

    def __call__(self, rows: Dict[str, List]) -> Dict[str, List[str]]:
        jobs = [Job.from_json(text) for text in rows["job"]]
        return {"outcome": [json.dumps(asdict(o)) for o in self.runner.run(jobs)]}


def _local(path: Optional[str]) -> Optional[str]:
    """An existing local path made absolute (workers do not start in this folder); anything else as it is."""
    if path is not None and Path(path).expanduser().exists():
        return str(Path(path).expanduser().resolve())
    return path


def run_on_ray(jobs: List[Job], out_dir: Path, address: Optional[str], *, workers: Optional[int],
               worker_cpus: float, retries: int, batch_size: Optional[int], model: str, dtype: Optional[str],
               tokenizer: Optional[str], force_frames: Optional[int], batch_invariant: bool = False
               ) -> Iterator[Outcome]:
    """Run prepared jobs on the cluster at `address` (None: the one started here, else a new local one) and
    yield their outcomes as they come back."""
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs Ray: pip install 'vibevoice-mlx[ray]'") from None
    joined = not ray.is_initialized()
    if joined:
        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise UserError(f"Cannot reach the Ray cluster {address or '(local)'}: {e}") from None
    try:
        resources = ray.cluster_resources()
        remote: Dict = {"num_cpus": worker_cpus}
        if resources.get("mlx"):
            remote["resources"], slots = {"mlx": 1}, int(resources["mlx"])
        elif resources.get("GPU"):
            remote["num_gpus"], slots = 1, int(resources["GPU"])
        else:
            slots = 1
        workers = workers or slots
        logger.info("Ray: %d job(s) on %d worker(s), %s each", len(jobs), workers, remote)
        data = ray.data.from_items([{"job": j.to_json()} for j in jobs])
        results = data.map_batches(
            BatchWorker,
            fn_constructor_kwargs=dict(out_dir=str(Path(out_dir).resolve()), model=_local(model), dtype=dtype,
                                       tokenizer=_local(tokenizer), batch_size=batch_size,
                                       force_frames=force_frames, batch_invariant=batch_invariant),
            batch_size=batch_size or MAX_BATCH,
            # one batch in flight per worker: a batch waits for a free worker rather than queueing behind one
            compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1),
            max_restarts=retries, max_task_retries=retries, **remote)
        try:
            for row in results.iter_rows():
                yield Outcome(**json.loads(row["outcome"]))
        except ray.exceptions.RayError as e:
            raise UserError(f"Ray stopped the run ({type(e).__name__}: {str(e).splitlines()[0]}); finished jobs "
                            "are kept: run the same command again to go on.") from None
    finally:
        if joined:
            ray.shutdown()
