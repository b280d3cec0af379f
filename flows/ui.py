"""`jielong ui` / `make ui`: the MLflow UI of the workspace's store on 127.0.0.1, opened on the runs table of
the pipeline runs (the experiment is tagged to open there: tasks/core/run_labels.py).

Pages a user wants (the README shows each):
    runs       /#/experiments/<id>/runs        the pipeline runs, named config · overrides · stages
    a run      /#/experiments/<id>/runs/<run>  its stages (nested runs), params, metrics, datasets, artifacts
    registry   /#/models                       the registered models and their versions
"""

from __future__ import annotations

import os
import socket
import sys
from urllib.parse import quote

from jielong.tasks.config import PipelineConfig, UserError

PIPELINE_RUNS = "tags.`jielong.kind` = 'pipeline'"  # compare, eval and study runs left out of the list


def runs_url(base: str, experiment_id: str, only_pipeline: bool = True) -> str:
    """The runs table in the UI's "Model training" mode. MLflow 3.17's UI takes an experiment's kind from
    its GenAI / Model training switch (the `workflowType` URL parameter, else the browser's last choice,
    GenAI at first), not from the experiment's tag (which earlier MLflow 3 UIs read): the URL says it."""
    url = f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    return f"{url}&searchFilter={quote(PIPELINE_RUNS)}" if only_pipeline else url


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def can_open_browser() -> bool:
    """A graphical session to open a browser in (on a server, webbrowser would start a text browser here)."""
    return sys.platform in ("darwin", "win32") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def experiment_id(cfg: PipelineConfig) -> str:
    """The config's experiment (made, and tagged to open on its runs, if it is not there yet)."""
    from jielong.tasks.core.tracking import Tracker

    return Tracker(cfg).experiment_id


def serve(cfg: PipelineConfig, port: int, open_browser: bool | None, say) -> None:
    """Serve the workspace's store until Ctrl-C; with a tracking server configured, only say its URLs."""
    import time
    import webbrowser

    from jielong.flows.operate import start_servers, stop_servers
    from jielong.tasks.core.tracking import tracking_uri

    uri = tracking_uri(cfg)
    workspace_store = f"sqlite:///{cfg.workspace_path() / 'mlflow.db'}"
    if uri.startswith(("http://", "https://")):
        say(f"runs      {runs_url(uri, experiment_id(cfg))}\nregistry  {uri.rstrip('/')}/#/models?workflowType=machine_learning")
        return
    if uri != workspace_store:
        raise UserError(f"jielong ui serves the workspace's store ({workspace_store}); for {uri} run "
                        f"`mlflow ui --backend-store-uri {uri} --host 127.0.0.1`")
    if not port_free(port):
        raise UserError(f"port {port} on 127.0.0.1 is in use (another `jielong ui`?): give --port")
    experiment = experiment_id(cfg)
    started = start_servers(cfg, None, port)
    base = started[0][2]
    url = runs_url(base, experiment)
    say(f"MLflow UI of {cfg.workspace_path()}\n  runs      {url}\n  registry  {base}/#/models?workflowType=machine_learning\n"
        "Ctrl-C stops it.")
    if open_browser if open_browser is not None else can_open_browser():
        webbrowser.open(url)
    try:
        while all(process.poll() is None for _, process, _ in started):
            time.sleep(1)
        say("the MLflow server exited")
    except KeyboardInterrupt:
        pass
    finally:
        stop_servers(started)
