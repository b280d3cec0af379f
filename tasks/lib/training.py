"""Where pretrain and instruct train: in the stage's process, or in torchrun workers.

`distributed: none` calls `models.train.train()` here, as always. `ddp` and `fsdp` hand the same loop
to `nproc` torchrun workers per node (models/distributed.py) through a job folder in the stage's work
directory, `<workspace>/<stage>/.work-<key>/distributed/`, next to its checkpoints, so a killed run
resumes from its latest checkpoint exactly as one process does. With `nnodes` > 1 the stage's node
runs one torchrun agent and every other node runs `jielong join` with the same config: it finds the
same job folder on the shared workspace (the key is computed from the config alone) and joins the
c10d rendezvous at `rdzv_endpoint` under the same id.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

from jielong.tasks.core.contract import StageContext, work_dir
from jielong.tasks.core.schema import UserError

if TYPE_CHECKING:
    from jielong.models.train import Batches, TrainReport

TRAINING_STAGES = ("pretrain", "instruct")


def job_dir(workspace: Path, stage: str, key: str) -> Path:
    return work_dir(workspace, stage, key) / "distributed"


def rdzv_id(stage: str, key: str) -> str:
    return f"jielong-{stage}-{key[:12]}"


def fit(ctx: StageContext, model, batches: Batches, describe_batches: Callable[[Path], dict], settings,
        prefix: str) -> TrainReport:
    """Train `model` in place as `settings` say; `describe_batches(folder)` gives the workers' batch spec
    (models.data.batches_from_spec), writing there any file it needs."""
    from jielong.models.train import resolve_device, train

    checkpoints = ctx.work_dir / "checkpoints"
    peak_cache = ctx.workspace / "peak_flops.json"
    if settings.distributed == "none":
        return train(model, batches, settings, checkpoints, ctx.log, prefix, peak_cache, desc=prefix)
    from jielong.models.distributed import WorkersFailed, resolve_backend, train_in_workers

    try:
        resolve_backend(settings.backend, resolve_device(settings.device), settings.nproc)
    except (ValueError, RuntimeError) as err:
        raise UserError(f"{prefix}: {err}") from None
    folder = job_dir(ctx.workspace, ctx.stage.name, ctx.key)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return train_in_workers(model, describe_batches(folder), settings.model_dump(mode="json"), checkpoints,
                                folder, ctx.log, prefix, peak_cache, rdzv_id(ctx.stage.name, ctx.key))
    except WorkersFailed as err:
        raise UserError(f"{prefix}: {err}") from None
