"""`jielong join`: the other nodes' share of a multi-node training stage (README: Training on several nodes).

The node running `jielong run` starts one torchrun agent per training stage whose `nnodes` is above 1;
every other node runs `jielong join` with the same config and overrides. Both compute the same stage
key from the config alone, so both find the job folder in the shared workspace and name the same
rendezvous id; join waits for the job file (it exists while the stage's workers may start), then runs
this node's torchrun agent on it.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Callable

from jielong.flows.stages import STAGES, stage_keys
from jielong.tasks.config import PipelineConfig, UserError
from jielong.tasks.core.contract import load_artifact
from jielong.tasks.lib.training import TRAINING_STAGES, job_dir, rdzv_id


def join(cfg: PipelineConfig, say: Callable[[str], None], poll_seconds: float = 1.0) -> None:
    """Every multi-node training stage of `cfg`, in pipeline order: wait until its job is written (or its
    artifact is complete: nothing to join), then run this node's workers in its rendezvous."""
    from jielong.models.distributed import WorkersFailed, run_torchrun

    keys = stage_keys(cfg)
    workspace = cfg.workspace_path()
    stages = [s.name for s in STAGES if s.name in TRAINING_STAGES and cfg.section(s.name).nnodes > 1]
    if not stages:
        raise UserError("nothing to join: no training stage of this config has nnodes > 1")
    for name in stages:
        settings, key = cfg.section(name), keys[name]
        job = job_dir(workspace, name, key) / "job.json"
        say(f"{name} ({key[:8]}): waiting for its job at {job}")
        while not job.exists():
            if load_artifact(workspace, name, key) is not None:
                break
            time.sleep(poll_seconds)
        else:
            say(f"{name}: joining the rendezvous at {settings.rdzv_endpoint} with {settings.nproc} process(es)")
            try:
                run_torchrun(job, settings.nproc, settings.nnodes, settings.rdzv_endpoint, rdzv_id(name, key),
                             log_name=f"workers-{socket.gethostname()}-{os.getpid()}.log")
            except WorkersFailed as err:
                raise UserError(f"{name}: {err}") from None
            say(f"{name}: this node's workers are done")
            continue
        say(f"{name}: already trained")
