"""The flow's task runner (`runner.kind`): threads, processes on this machine, or a Dask cluster
(flows/dask_runner.py)."""

from __future__ import annotations

from jielong.tasks.config import PipelineConfig, UserError


def make_task_runner(cfg: PipelineConfig):
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

    runner = cfg.runner
    if runner.kind == "thread":
        return ThreadPoolTaskRunner(max_workers=runner.workers)
    if runner.kind == "dask":
        return _dask_runner().task_runner(runner)
    return ProcessPoolTaskRunner(max_workers=runner.workers)


def check_runner(cfg: PipelineConfig) -> None:
    """An external Dask cluster answers and its workers see the workspace (flows/dask_runner.py)."""
    if cfg.runner.kind == "dask" and cfg.runner.dask_address:
        _dask_runner().check_cluster(cfg.runner.dask_address, cfg.workspace_path())


def _dask_runner():
    try:
        from jielong.flows import dask_runner
    except ImportError:
        raise UserError("runner.kind=dask needs the dask extra: pip install 'jielong[dask]'") from None
    return dask_runner
