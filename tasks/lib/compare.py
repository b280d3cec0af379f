"""Side-by-side comparison of pipeline runs: a table of key metrics and differing params, overlaid
training curves and kNN-LM size sweeps, saved as CSV/Markdown/PNG and logged as a `compare` run."""

from __future__ import annotations

from datetime import datetime, timezone

from jielong.tasks.core.config import RunConfig
from jielong.tasks.core.schema import UserError
from jielong.tasks.core.tracking import Tracker

KEY_METRICS = [
    "clean/kept_fraction", "dedup/documents_out", "dedup/near_duplicate_fraction", "tokenize/train_tokens",
    "pretrain/final_val_loss", "pretrain/tokens_per_s", "instruct/heldout_response_loss_after",
    "eval_pretrain/perplexity", "eval_pretrain/bits_per_byte", "eval_pretrain/ece_10_bin",
    "eval_pretrain/knnlm_perplexity", "eval_instruct/perplexity", "eval_instruct/bits_per_byte",
]


def pipeline_runs(tracker: Tracker, run_ids: list[str], last: int) -> list:
    if run_ids:
        return [tracker.client.get_run(r) for r in run_ids]
    runs = tracker.client.search_runs([tracker.experiment_id],
                                      "tags.`jielong.config_hash` != '' and attributes.status = 'FINISHED'",
                                      order_by=["attributes.start_time DESC"], max_results=200)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags and r.info.run_name.startswith("pipeline-")]
    return list(reversed(parents[:last]))


def stage_run(tracker: Tracker, parent, stage: str):
    """The run that produced a stage's artifact for this parent (following cache hits)."""
    children = tracker.client.search_runs(
        [tracker.experiment_id],
        f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.`jielong.stage` = '{stage}'")
    if not children:
        return None
    source = children[0].data.tags.get("jielong.source_run_id")
    return tracker.client.get_run(source) if source else children[0]


def compare(cfg: RunConfig, run_ids: list[str], last: int) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    tracker = Tracker(cfg)
    runs = pipeline_runs(tracker, run_ids, last)
    if not runs:
        raise UserError(f"no pipeline runs in MLflow experiment {cfg.mlflow.experiment!r} at {tracker.uri}")
    labels = [f"{r.info.run_name} {r.info.run_id[:8]}" for r in runs]
    params = [r.data.params for r in runs]
    differing = sorted(k for k in set().union(*params) if len({p.get(k) for p in params}) > 1)
    rows = []
    for label, run in zip(labels, runs):
        row = {"run": label, "started": datetime.fromtimestamp(run.info.start_time / 1000, timezone.utc).isoformat(timespec="seconds")}
        row.update({k: run.data.params.get(k) for k in differing})
        row.update({m: run.data.metrics.get(m) for m in KEY_METRICS if any(m in r.data.metrics for r in runs)})
        rows.append(row)
    table = pd.DataFrame(rows)

    out = cfg.workspace_path() / "compare" / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "compare.csv", index=False)
    (out / "compare.md").write_text(table.to_markdown(index=False))
    files = [out / "compare.csv", out / "compare.md"]

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, run in zip(labels, runs):
        producer = stage_run(tracker, run, "pretrain")
        for name, style in (("pretrain/loss", "-"), ("pretrain/val_loss", "o--")):
            history = tracker.client.get_metric_history(producer.info.run_id, name) if producer else []
            if history:
                ax.plot([m.step for m in history], [m.value for m in history], style, label=f"{label} {name.split('/')[1]}", markersize=3)
    ax.set_xlabel("step"), ax.set_ylabel("loss (nats/token)"), ax.set_title("pretraining curves")
    ax.legend(fontsize=7)
    fig.tight_layout(), fig.savefig(out / "training_curves.png", dpi=100), plt.close(fig)
    files.append(out / "training_curves.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, run in zip(labels, runs):
        sweep = sorted((int(k.split("/")[-2].removesuffix("pct")), v) for k, v in run.data.metrics.items()
                       if k.startswith("eval_pretrain/knnlm_sweep/") and k.endswith("/perplexity"))
        if sweep:
            ax.plot(*zip(*sweep), "o-", label=label)
    ax.set_xlabel("datastore size (% of train tokens)"), ax.set_ylabel("test perplexity"), ax.set_title("kNN-LM")
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout(), fig.savefig(out / "knnlm_sweep.png", dpi=100), plt.close(fig)
    files.append(out / "knnlm_sweep.png")

    run_id = tracker.start_run("compare", {"jielong.compared_runs": ",".join(r.info.run_id for r in runs)})
    tracker.log_artifacts(run_id, files)
    tracker.end_run(run_id)
    return {"table": table, "files": files, "run_id": run_id}

