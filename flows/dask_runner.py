"""Data-stage shard tasks on a Dask cluster (`runner.kind: dask`), through prefect-dask.

With `runner.dask_address`, jielong connects to a scheduler started outside it:

    dask scheduler --host 10.0.0.5                  # on one machine
    dask worker tcp://10.0.0.5:8786 --nthreads 1    # on each worker machine (as many as wanted)

The scheduler and every worker need the jielong package (`pip install 'jielong[dask]'`, the flow's
version: Dask unpickles the tasks, which name jielong's functions, on both), and the workers need the
workspace at the same absolute path (a shared filesystem): shard tasks read their inputs and write
their shards there, and the flow process publishes the artifact. Without an address, a local
cluster of `runner.workers` processes is started for the run.

Task runs report to the flow's Prefect API. prefect-dask sends each task its flow's settings, so the
task run itself is recorded there; but a worker process whose own environment names no API (as one
started by hand) would start a temporary Prefect server of its own (seconds per worker) whenever
Prefect runs outside a task's context there (log shipping in other threads, shutdown), recording to
a server nobody sees. So the flow registers a worker plugin that puts the flow's PREFECT_API_URL into
every worker's environment and Prefect settings, on the workers present and on those that join later.
Only the URL travels, never an API key: a worker reporting to an authenticated Prefect server needs its
own PREFECT_API_KEY.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
from pathlib import Path

from distributed import Client
from distributed.diagnostics.plugin import WorkerPlugin
from prefect_dask import DaskTaskRunner

from jielong.tasks.core.config import RunnerConfig
from jielong.tasks.core.schema import UserError

PLUGIN_NAME = "jielong-prefect-api"
CONNECT_TIMEOUT_S = 10
WORKER_WAIT_S = 10


class PrefectApiPlugin(WorkerPlugin):
    """Point a worker process at one Prefect API (its environment and Prefect's global settings)."""

    def __init__(self, api_url: str):
        self.api_url = api_url

    def setup(self, worker) -> None:
        os.environ["PREFECT_API_URL"] = self.api_url
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()


class ReportingDaskTaskRunner(DaskTaskRunner):
    """prefect-dask's task runner, whose workers report to the flow's Prefect API (see the module
    docstring). The Dask client is created on first use, in the flow run, whose settings name the API."""

    @property
    def client(self):
        if self._client is not None:
            return self._client
        client = super().client
        api_url = _flow_api_url()
        if api_url:
            client.register_plugin(PrefectApiPlugin(api_url), name=PLUGIN_NAME)
        return client


def _flow_api_url() -> str | None:
    from prefect.settings import get_current_settings

    return get_current_settings().api.url or os.environ.get("PREFECT_API_URL")


def task_runner(runner: RunnerConfig) -> ReportingDaskTaskRunner:
    if runner.dask_address:
        return ReportingDaskTaskRunner(address=runner.dask_address)
    return ReportingDaskTaskRunner(cluster_kwargs={"n_workers": runner.workers, "processes": True, "threads_per_worker": 1,
                                                   "dashboard_address": None})


def check_cluster(address: str, workspace: Path) -> None:
    """Fail with a message, before the flow starts, when the scheduler does not answer, when it or its
    workers cannot import jielong, or when workers cannot see the workspace; warn when it has no
    workers yet (tasks wait for one)."""
    try:
        client = Client(address, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
    except Exception as err:  # OSError on a timeout, ValueError on a malformed address, ...
        raise UserError(f"runner.dask_address: no Dask scheduler answers at {address} ({type(err).__name__}: {err}). "
                        f"Start one (`dask scheduler`, then `dask worker {address}` on each worker machine) "
                        "or fix the address") from None
    with client:
        _require_jielong([f"the scheduler at {address}"] if _lacks_jielong(client.run_on_scheduler) else [])
        try:
            client.wait_for_workers(1, timeout=WORKER_WAIT_S)
        except TimeoutError:
            import sys

            print(f"Warning: the Dask scheduler at {address} has no workers yet; shard tasks wait until one joins "
                  f"(`dask worker {address}`).", file=sys.stderr)
            return
        found = client.run(importlib.util.find_spec, __name__, on_error="return")
        _require_jielong([f"worker {worker}" for worker, spec in found.items() if _missing(spec)])
        workspace.mkdir(parents=True, exist_ok=True)
        blind = sorted(worker for worker, seen in client.run(os.path.isdir, str(workspace)).items() if not seen)
        if blind:
            raise UserError(f"Dask workers {', '.join(blind)} do not see the workspace {workspace}: workers need it at the "
                            "same absolute path, on a shared filesystem")


def _missing(spec) -> bool:
    return not isinstance(spec, importlib.machinery.ModuleSpec)  # None, or the error looking for it


def _lacks_jielong(run) -> bool:
    try:
        return _missing(run(importlib.util.find_spec, __name__))
    except Exception:
        return True


def _require_jielong(lacking: list[str]) -> None:
    if lacking:
        raise UserError(f"{', '.join(sorted(lacking))} cannot import jielong ({__name__}): install the same jielong, with "
                        "its dask extra (pip install 'jielong[dask]'), where the Dask scheduler and workers run")
