"""One cached `jielong run --only dedup`, timed phase by phase inside the process (run by bench_rerun.py
with the checkout under test first on PYTHONPATH).

    python bench/rerun_phases.py WORKSPACE OUT.json

It does what `jielong run` does, in the same order, for the code before and after the rerun work:
where the after code starts MLflow in a second process (`prestart_tracker`) it does too. Phases are
measured by wrapping the functions that do them: the Prefect API (`share_prefect_api` before,
`resolve_prefect_api` after), MLflow set-up (creating the tracker) and MLflow calls (every call the flow
makes to the tracker, including, after, waiting for its process to be ready).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import defaultdict

START = time.perf_counter()
spent: dict[str, float] = defaultdict(float)


def timed(fn, phase: str):
    def run(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[phase] += time.perf_counter() - start

    return run


class TimedTracker:
    """Every method call on the wrapped tracker counts as MLflow time."""

    def __init__(self, tracker):
        self._tracker = tracker

    def __getattr__(self, name):
        return timed(getattr(self._tracker, name), "calls")


def main() -> None:
    workspace, out = sys.argv[1], sys.argv[2]
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # as `jielong` sets them
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    import jielong.flows.cli  # noqa: F401  (what the command imports first)
    import jielong.tasks.core.tracking as tracking
    from jielong.tasks.config import load_config

    overrides = [f"workspace={workspace}"]
    if hasattr(tracking, "prestart_tracker"):
        tracking.prestart_tracker(load_config("tiny", overrides))
    import jielong.flows.pipeline as pipeline

    try:  # code since flows/pipeline.py was split by concern
        from jielong.flows import entry_points, prefect_api
    except ImportError:
        entry_points = prefect_api = pipeline

    imports = time.perf_counter() - START
    api = "share_prefect_api" if hasattr(prefect_api, "share_prefect_api") else "resolve_prefect_api"
    setattr(prefect_api, api, timed(getattr(prefect_api, api), "api"))
    factory = "open_tracker" if hasattr(pipeline, "open_tracker") else "Tracker"
    make = timed(getattr(pipeline, factory), "setup")
    setattr(pipeline, factory, lambda cfg: TimedTracker(make(cfg)))
    start = time.perf_counter()
    summaries = entry_points.run_pipeline("tiny", overrides, ["dedup"])
    flow = time.perf_counter() - start
    assert [s["status"] for s in summaries] == ["cached"], summaries
    phases = {
        "imports": imports,
        "Prefect API": spent["api"],
        "MLflow set-up": spent["setup"],
        "MLflow calls": spent["calls"],
        "flow and task-run bookkeeping": flow - spent["api"] - spent["setup"] - spent["calls"],
        "total": time.perf_counter() - START,
    }
    with open(out, "w") as handle:
        json.dump(phases, handle)
    sys.stdout.flush()
    if hasattr(jielong.flows.cli, "exit_without_teardown"):
        jielong.flows.cli.exit_without_teardown(0)  # as `jielong` exits


if __name__ == "__main__":
    main()
