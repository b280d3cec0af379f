"""`jielong monitor URL --model M --interval S`: a scheduled Prefect flow that watches a served model.

Each run sends the probe set (bounded: rounds x probes requests, `concurrency` in flight), and records
the figures of tasks/lib/deploy/monitor.py as MLflow metrics on one run per (URL, model, probe set),
named `monitor <model>`, step = the run's number, so the MLflow UI draws them over time. A figure over
its threshold ends the flow run Failed, with a message naming the figure (Prefect's UI and automations
see it); the MLflow run is then marked FAILED too, until a healthy run marks it FINISHED again.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

from prefect import flow

from jielong.flows.deploy import model_folder, served_task, slug
from jielong.tasks.config import UserError, load_config


class MonitorAlert(UserError):
    """A monitored figure crossed its threshold."""


def monitor_key(url: str, model: str, probes: str | None) -> str:
    return hashlib.sha256(f"{url}\n{model}\n{probes or ''}".encode()).hexdigest()[:16]


@flow(name="jielong-monitor")
def monitor(url: str, model: str, api: str, config: str = "tiny", overrides: list[str] | None = None,
            probes: str | None = None, max_new_tokens: int = 16, rounds: int = 1, concurrency: int = 2,
            thresholds: dict | None = None, timeout: float = 30.0) -> dict:
    """One look at the endpoint: figures logged to MLflow; raises MonitorAlert when a threshold is crossed."""
    from jielong.flows.cli import quiet_user_errors

    quiet_user_errors()  # scheduled runs start in processes of their own: an alert is logged as its message, no traceback
    from jielong.models.parity import load_probes
    from jielong.tasks.lib.deploy.check import figures, reference, send
    from jielong.tasks.lib.deploy.endpoint import Endpoint
    from jielong.tasks.lib.deploy.monitor import crossed, figures_of, thresholds_from

    cfg = load_config(config, overrides or [])
    limits = thresholds_from(thresholds)
    folder = model_folder(model, cfg)
    endpoint = Endpoint(url, served_task(folder), timeout=timeout, api=api)
    asked = [p for p in load_probes(Path(probes) if probes else None) if endpoint.answers(p)]
    ref = reference(folder, asked, max_new_tokens)
    answers = send(endpoint, asked, max_new_tokens, rounds, concurrency)
    check = figures(answers, ref.answers)
    served = {a.probe: a.text for a in answers if a.error is None}
    seen = figures_of(check, ref.perplexity(asked, served), ref.perplexity(asked, ref.answers))
    alerts = crossed(seen, limits)
    run_id, step = log_look(cfg, url, model, monitor_key(url, model, probes), seen, alerts)
    if alerts:
        raise MonitorAlert(f"monitor of {model} at {url}: {'; '.join(alerts)} (MLflow run {run_id}, step {step})")
    return {**seen, "run_id": run_id, "step": step}


def log_look(cfg, url: str, model: str, key: str, seen: dict[str, float], alerts: list[str]) -> tuple[str, int]:
    """The figures as metrics at the next step of the monitor's one MLflow run (created on first use)."""
    from jielong.tasks.core.tracking import Tracker

    tracker = Tracker(cfg)
    found = tracker.client.search_runs([tracker.experiment_id], filter_string=f"tags.`jielong.monitor` = '{key}'",
                                       max_results=1)
    if found:
        run_id = found[0].info.run_id
    else:
        run_id = tracker.start_run(f"monitor {slug(model)}", {"jielong.monitor": key, "jielong.model": model,
                                                               "jielong.endpoint": url})
    step = len(tracker.client.get_metric_history(run_id, "monitor/error_rate"))
    metrics = {f"monitor/{name}": value for name, value in seen.items() if not math.isnan(value)}
    tracker.log_metrics(run_id, {**metrics, "monitor/thresholds_crossed": float(len(alerts))}, step=step)
    tracker.set_tags(run_id, {"jielong.monitor.last": "; ".join(alerts) or "healthy"})
    if alerts:
        tracker.mark_failed(run_id)
    else:
        tracker.end_run(run_id)
    return run_id, step


def serve_monitor(url: str, model: str, interval: float, name: str | None, config: str, overrides: list[str],
                  probes: str | None, thresholds: dict, max_new_tokens: int = 16, rounds: int = 1,
                  concurrency: int = 2) -> None:
    """Check everything once, then register (and serve, until interrupted) the monitor's deployment."""
    from prefect.settings import get_current_settings

    from jielong.models.parity import load_probes
    from jielong.tasks.lib.deploy.endpoint import Endpoint
    from jielong.tasks.lib.deploy.monitor import thresholds_from

    if not interval or interval <= 0:
        raise UserError("give --interval SECONDS (> 0)")
    thresholds_from(thresholds)
    cfg = load_config(config, overrides)
    probe_set = load_probes(Path(probes) if probes else None)
    endpoint = Endpoint(url, served_task(model_folder(model, cfg)))  # reachable now, and of a known kind
    if not any(endpoint.answers(p) for p in probe_set):
        raise UserError(f"{url} takes none of the probes' kinds ({endpoint.kind}); give a probe set with other kinds")
    if not (os.environ.get("PREFECT_API_URL") or get_current_settings().api.url):
        raise UserError("scheduling needs a Prefect server: run `jielong server` and export the PREFECT_API_URL it prints")
    monitor.serve(
        name=name or f"jielong-monitor-{slug(model)}",
        interval=interval,
        parameters={"url": url, "model": model, "api": endpoint.kind, "config": config, "overrides": overrides,
                    "probes": probes, "max_new_tokens": max_new_tokens, "rounds": rounds, "concurrency": concurrency,
                    "thresholds": thresholds},
        description=f"jielong monitor of {model} served at {url}",
        limit=1,  # one look at a time: a slow look must not overlap the next (its step number, its load)
    )
