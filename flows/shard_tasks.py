"""A data stage's shard jobs as Prefect task runs on the flow's task runner (threads, processes, Dask)."""

from __future__ import annotations

from typing import Any, Callable

from prefect import task
from prefect.cache_policies import NONE
from prefect.futures import as_completed


def _retry_on_io_error(task: Any, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except OSError:
        return True
    except BaseException:
        return False
    return False


def prefect_map(stage_name: str) -> Callable[[Callable[[Any], dict], list[Any]], list[dict]]:
    """ctx.map for a stage: one Prefect task run per shard job on the flow's task runner."""

    def run_shards(fn: Callable[[Any], dict], jobs: list[Any]) -> list[dict]:
        if not jobs:
            return []
        shard_task = task(
            fn,
            name=f"{stage_name}.{fn.__name__}",
            retries=2,
            retry_delay_seconds=1,
            retry_condition_fn=_retry_on_io_error,
            cache_policy=NONE,
            persist_result=False,
        )
        futures = shard_task.map(jobs)
        from tqdm import tqdm

        with tqdm(total=len(jobs), desc=f"{stage_name}.{fn.__name__}", unit="shard", leave=False, disable=None) as bar:
            for _ in as_completed(futures):
                bar.update()
        return [f.result() for f in futures]

    return run_shards
