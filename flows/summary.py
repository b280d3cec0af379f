"""A stage's line in the summary `jielong run` prints: what it consumed and produced, and its headline number."""

from __future__ import annotations

import json

from jielong.tasks.core.contract import Artifact

HEADLINE = {"bits_per_byte": "test bits/byte", "heldout_response_loss_after": "held-out response loss", "final_val_loss": "val loss",
            "train_tokens": "train tokens", "kept_fraction": "kept"}


def stage_summary(artifact: Artifact, status: str, run_id: str, parent_id: str) -> dict:
    """The summary of one stage of this invocation: `status` is ran, forced or cached."""
    counts = artifact.manifest["counts"]
    metrics = artifact.manifest.get("metrics", {})
    headline = next((f"{label} {_number(metrics[name])}" for name, label in HEADLINE.items() if name in metrics), "")
    consumed, produced = consumed_produced(artifact.stage, artifact)
    return {
        "headline": headline,
        "stage": artifact.stage,
        "key": artifact.key,
        "status": status,
        "in": consumed,
        "out": produced,
        "documents_in": counts["documents_in"],
        "documents_out": counts["documents_out"],
        "rejected": counts["documents_rejected"],
        "seconds": artifact.manifest["timings"]["seconds"],
        "path": str(artifact.path),
        "mlflow_run_id": run_id,
        "parent_run_id": parent_id,
    }


def consumed_produced(stage: str, artifact: Artifact) -> tuple[str, str]:
    """What a stage consumed and produced, each in its own unit: documents for the data stages, tokens for
    tokenize (out), pretrain and instruct (in; out is the model's parameters), documents in and tokens and
    examples scored out for an evaluation."""
    counts, metrics = artifact.manifest["counts"], artifact.manifest.get("metrics", {})
    details = artifact.manifest.get("details", {})
    documents_in = _amount(counts["documents_in"], "docs")
    if stage == "tokenize":
        return documents_in, _amount(sum(metrics.get(f"{s}_tokens", 0) for s in ("train", "validation", "test")), "tokens")
    if stage in ("pretrain", "instruct"):
        # instruct manifests written before tokens_seen was recorded count the pairs it read
        consumed = (_amount(details["tokens_seen"], "tokens") if "tokens_seen" in details
                    else _amount(counts["documents_in"], "pairs"))
        return consumed, _amount(metrics.get("parameters", 0), "params")
    if stage.startswith("eval_"):
        report = json.loads((artifact.path / "report.json").read_text(encoding="utf-8"))
        examples = sum(task["n_examples"] for task in report.get("icl", {}).get("tasks", {}).values())
        return (_amount(metrics.get("documents", 0), "docs"),
                f"{_amount(metrics.get('tokens', 0), 'tokens')} + {_amount(examples, 'examples')}")
    return documents_in, _amount(counts["documents_out"], "docs")


def _number(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:.4g}"


def _amount(n: float, unit: str) -> str:
    return f"{int(n):,} {unit}"
