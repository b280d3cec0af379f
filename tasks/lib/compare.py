"""Side-by-side comparison of pipeline runs: a table of key metrics and differing params, overlaid
training curves and kNN-LM size sweeps, saved as CSV/Markdown/PNG and logged as a `compare` run."""

from __future__ import annotations

from datetime import datetime, timezone

from jielong.tasks.core.config import RunConfig
from jielong.tasks.core.schema import UserError
from jielong.tasks.core.run_labels import COMPLETE_TAG, KIND_TAG
from jielong.tasks.core.tracking import Tracker

ABSENT = "—"  # a setting or metric a compared run does not have

KEY_METRICS = [
    "clean/kept_fraction", "dedup/documents_out", "dedup/near_duplicate_fraction", "tokenize/train_tokens",
    "pretrain/final_val_loss", "pretrain/tokens_per_s", "instruct/heldout_response_loss_after",
    "eval_pretrain/perplexity", "eval_pretrain/bits_per_byte", "eval_pretrain/ece_10_bin",
    "eval_pretrain/knnlm_perplexity", "eval_instruct/perplexity", "eval_instruct/bits_per_byte",
]


def pipeline_runs(tracker: Tracker, run_ids: list[str], last: int, include_partial: bool = False) -> list:
    """The runs named, else the `last` newest finished top-level pipeline runs, oldest first: complete ones
    only (tasks/core/run_labels.py says which are), unless include_partial, which also takes the pipeline runs
    logged before runs had kinds (named pipeline-<config>)."""
    if run_ids:
        return [_get_run(tracker, r) for r in run_ids]
    wanted = f"tags.`{KIND_TAG}` = 'pipeline' and attributes.status = 'FINISHED'"
    searches = [wanted if include_partial else f"{wanted} and tags.`{COMPLETE_TAG}` = 'true'"]
    if include_partial:
        searches.append("attributes.run_name LIKE 'pipeline-%' and attributes.status = 'FINISHED'")
    runs = [r for search in searches for r in tracker.client.search_runs(
        [tracker.experiment_id], search, order_by=["attributes.start_time DESC"], max_results=max(last, 1))]
    unique = {r.info.run_id: r for r in runs if "mlflow.parentRunId" not in r.data.tags}
    runs = sorted(unique.values(), key=lambda r: -r.info.start_time)
    return list(reversed(runs[:last]))


def _get_run(tracker: Tracker, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        return tracker.client.get_run(run_id)
    except MlflowException:
        raise UserError(f"no MLflow run {run_id!r} at {tracker.uri}") from None


def stage_run(tracker: Tracker, parent, stage: str):
    """The run that produced a stage's artifact for this parent (following cache hits)."""
    children = tracker.client.search_runs(
        [tracker.experiment_id],
        f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.`jielong.stage` = '{stage}'")
    if not children:
        return None
    source = children[0].data.tags.get("jielong.source_run_id")
    return tracker.client.get_run(source) if source else children[0]


def compare(cfg: RunConfig, run_ids: list[str], last: int, include_partial: bool = False) -> dict:
    """The table (settings that differ first, then key metrics), the plots that have data (`left_out` says
    why the others are missing), saved under <workspace>/compare/<time>/ and logged as a `compare` run."""
    tracker = Tracker(cfg)
    runs = pipeline_runs(tracker, run_ids, last, include_partial)
    if not runs:
        which = "pipeline runs" if include_partial else "complete pipeline runs (--include-partial takes the others too)"
        raise UserError(f"no {which} in MLflow experiment {cfg.mlflow.experiment!r} at {tracker.uri}")
    labels = [f"{r.info.run_name} {r.info.run_id[:8]}" for r in runs]
    table = comparison_table(labels, runs)

    out = cfg.workspace_path() / "compare" / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "compare.csv", index=False)
    (out / "compare.md").write_text(table.astype(object).where(table.notna(), ABSENT).to_markdown(index=False))
    files = [out / "compare.csv", out / "compare.md"]
    left_out = []
    for name, series in (("training_curves.png", _curves(tracker, labels, runs)), ("knnlm_sweep.png", _sweeps(labels, runs))):
        if series:
            _plot(series, out / name, *PLOTS[name])
            files.append(out / name)
        else:
            left_out.append(f"{name} left out: {PLOTS[name][3]}")

    run_id = tracker.start_run("compare", {"jielong.compared_runs": ",".join(r.info.run_id for r in runs), KIND_TAG: "compare"})
    tracker.log_artifacts(run_id, files)
    tracker.end_run(run_id)
    return {"table": table, "files": files, "run_id": run_id, "left_out": left_out}


def comparison_table(labels: list[str], runs: list):
    """A row per run: the settings that differ (a setting a run lacks is ABSENT), the key metrics any run has
    (missing ones None), when it started. jielong.* params are left out: the run names show them."""
    import pandas as pd

    params = [r.data.params for r in runs]
    names = sorted(k for k in set().union(*params) if not k.startswith("jielong."))
    differing = [k for k in names if len({p.get(k, ABSENT) for p in params}) > 1]
    metrics = [m for m in KEY_METRICS if any(m in r.data.metrics for r in runs)]
    rows = []
    for label, run in zip(labels, runs):
        row = {"run": label}
        row.update({k: run.data.params.get(k, ABSENT) for k in differing})
        row.update({m: run.data.metrics.get(m) for m in metrics})
        row["started"] = datetime.fromtimestamp(run.info.start_time / 1000, timezone.utc).isoformat(timespec="seconds")
        rows.append(row)
    return pd.DataFrame(rows)


# file -> (title, x label, y label, why it is left out when no run has data for it)
PLOTS = {
    "training_curves.png": ("pretraining curves", "step", "loss (nats/token)", "no compared run has pretraining curves (none ran or "
                            "cached the pretrain stage)"),
    "knnlm_sweep.png": ("kNN-LM", "datastore size (% of train tokens)", "test perplexity",
                        "no compared run has a kNN-LM datastore sweep (evaluate.knnlm.sweep, eval_pretrain)"),
}


def _curves(tracker: Tracker, labels: list[str], runs: list) -> list[tuple[str, str, list, list]]:
    """(label, style, x, y) of each pretraining curve, read from the run that trained (through cache hits)."""
    series = []
    for label, run in zip(labels, runs):
        producer = stage_run(tracker, run, "pretrain")
        for name, style in (("pretrain/loss", "-"), ("pretrain/val_loss", "o--")):
            history = tracker.client.get_metric_history(producer.info.run_id, name) if producer else []
            if history:
                series.append((f"{label} {name.split('/')[1]}", style, [m.step for m in history], [m.value for m in history]))
    return series


def _sweeps(labels: list[str], runs: list) -> list[tuple[str, str, list, list]]:
    series = []
    for label, run in zip(labels, runs):
        sweep = sorted((int(k.split("/")[-2].removesuffix("pct")), v) for k, v in run.data.metrics.items()
                       if k.startswith("eval_pretrain/knnlm_sweep/") and k.endswith("/perplexity"))
        if sweep:
            x, y = zip(*sweep)
            series.append((label, "o-", list(x), list(y)))
    return series


def _plot(series: list[tuple[str, str, list, list]], path, title: str, xlabel: str, ylabel: str, _why: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, style, x, y in series:
        ax.plot(x, y, style, label=label, markersize=3)
    ax.set_xlabel(xlabel), ax.set_ylabel(ylabel), ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout(), fig.savefig(path, dpi=100), plt.close(fig)
