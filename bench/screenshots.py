"""The README's pictures of the MLflow UI, taken by a real headless browser from a real workspace.

    make run                                    # the workspace these pictures show (data/)
    pip install -e '.[screenshots]'             # Playwright for Python (its browser download is not used)
    apt-get install chromium                    # the browser it drives (Debian; or pass --chromium PATH)
    python bench/screenshots.py                 # writes docs/mlflow-runs.png, mlflow-run.png, mlflow-registry.png

It serves the workspace's store as `jielong ui` does (127.0.0.1, a free port), opens the three pages a user
wants — the runs table, the newest complete pipeline run, the model registry — and saves each page.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# the runs table's columns besides the name: the data, the stages run, a headline number per stage
COLUMNS = ["attributes.`Dataset`", "tags.`jielong.stages`", "metrics.`clean/kept_fraction`",
           "metrics.`dedup/documents_out`", "metrics.`pretrain/final_val_loss`",
           "metrics.`instruct/heldout_response_loss_after`", "metrics.`eval_pretrain/bits_per_byte`",
           "metrics.`eval_instruct/bits_per_byte`"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def newest_complete_run(uri: str, experiment: str) -> str:
    from mlflow import MlflowClient

    runs = MlflowClient(uri).search_runs(
        [experiment], "tags.`jielong.kind` = 'pipeline' and tags.`jielong.complete` = 'true'",
        order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        sys.exit(f"no complete pipeline run in {uri}: run `make run` first")
    return runs[0].info.run_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="as for jielong run")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"),
                        help="the browser's executable (default: chromium on PATH)")
    args = parser.parse_args()
    if not args.chromium:
        sys.exit("no chromium on PATH: apt-get install chromium, or pass --chromium PATH")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sys.exit("Playwright is not installed: pip install -e '.[screenshots]'")

    from jielong.flows.operate import start_servers, stop_servers
    from jielong.flows.ui import experiment_id, runs_url
    from jielong.tasks.config import load_config
    from jielong.tasks.core.tracking import tracking_uri

    cfg = load_config(args.config, args.overrides)
    experiment = experiment_id(cfg)
    run_id = newest_complete_run(tracking_uri(cfg), experiment)
    started = start_servers(cfg, None, free_port())
    base = started[0][2]
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1600, "height": 900}, device_scale_factor=1)
            prepare_browser(page, base, experiment)
            shoot(page, runs_url(base, experiment), "all stages", args.out / "mlflow-runs.png")
            shoot(page, f"{base}/#/experiments/{experiment}/runs/{run_id}?workflowType=machine_learning", "Child runs",
                  args.out / "mlflow-run.png")
            shoot(page, f"{base}/#/models?workflowType=machine_learning", "jielong-instruct", args.out / "mlflow-registry.png")
            browser.close()
    finally:
        stop_servers(started)


def prepare_browser(page, base: str, experiment: str) -> None:
    """What a user does once, kept by the browser: close the assistant panel that opens on the first visit,
    pick the runs table's columns (per experiment; in local storage, as the UI keeps them) and switch the
    UI from GenAI to Model training."""
    import json

    page.goto(f"{base}/#/models")
    state = {"selectedColumns": COLUMNS, "searchFilter": "", "orderByKey": "attributes.start_time",
             "orderByAsc": False, "startTime": "ALL", "lifecycleFilter": "Active", "datasetsFilter": [],
             "modelVersionFilter": "All Runs", "runsExpanded": {}}
    stored = {
        "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",
        "mlflow.assistant.panelOpen_v1": "false",
        f'MLflowLocalStorage-1.1-ExperimentPage-["{experiment}"]-ReactComponentState': json.dumps(state),
    }
    for key, value in stored.items():
        page.evaluate(f"window.localStorage.setItem({json.dumps(key)}, {json.dumps(value)})")
    page.reload()
    page.get_by_text("Model training", exact=True).click()  # the UI's switch, remembered by the browser
    page.wait_for_timeout(1000)


def shoot(page, url: str, text: str, path: Path) -> None:
    page.goto(url)
    page.reload()  # a hash change alone keeps the state the previous page loaded
    page.wait_for_selector(f"text={text}", timeout=60_000)
    page.wait_for_timeout(3000)  # the rest of the page settles after its data arrives (the UI keeps polling)
    if page.get_by_role("dialog").count():  # the registry's "new Model Registry UI" announcement, once
        page.keyboard.press("Escape")
        page.wait_for_timeout(1000)
    page.screenshot(path=str(path))
    print(f"{path}  ({url})")


if __name__ == "__main__":
    main()
