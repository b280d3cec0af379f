"""Runs every enabled evaluation of one model and assembles the report (see the package docstring).

The evaluations are declared in registry.py; each returns its part, and only this module writes the
report, the metrics and the figure list.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from jielong.tasks.core.contract import ConfigView
from jielong.tasks.core.schema import UserError
from jielong.tasks.lib.evaluation import perplexity, report
from jielong.tasks.lib.evaluation.config import EvaluateConfig
from jielong.tasks.lib.evaluation.model import LoadedModel, load
from jielong.tasks.lib.evaluation.registry import EVALUATIONS, Inputs, SectionResult


def evaluate_model(model_dir: Path, data: dict[str, list[Path]], cfg: EvaluateConfig | ConfigView, out_dir: Path,
                   seed: int | None = 1234, device: str = "auto", precision: str = "auto") -> dict:
    """Evaluate one local Hugging Face causal LM. `data` maps 'train'/'validation'/'test' to Parquet
    files (columns id, text, source). `cfg` is the evaluate section, or the stage's view of it (which
    holds only what the enabled evaluations read); `seed` may be None when no in-context or kNN-LM
    evaluation draws. Runs each enabled evaluation of registry.EVALUATIONS, in order, and assembles
    their parts. Writes out_dir/report.json, report.md and PNG plots; returns
    {"metrics": {flat name: float}, "plots": [Path], "report_json": Path, "report_md": Path}."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if seed is not None:
        torch.manual_seed(seed)
    lm = load(model_dir, device, cfg.max_length, precision)
    splits = {name: read_documents(paths) for name, paths in data.items()}
    if not splits.get("test"):
        raise UserError("evaluate: the test split is empty")
    enabled = [e for e in EVALUATIONS if e.enabled(cfg)]
    prepared = {e.name: e.module().prepare(cfg, splits, seed) for e in enabled if e.prepares}

    t = time.perf_counter()
    inputs = inputs_of(lm, cfg, splits, seed, out_dir, prepared)
    timings = {"perplexity": time.perf_counter() - t}  # the shared test pass counts as perplexity's time
    parts: dict[str, SectionResult] = {}
    for evaluation in enabled:
        t = time.perf_counter()
        part = evaluation.module().run(inputs)
        if part is not None:
            parts[evaluation.name] = part
            timings[evaluation.name] = timings.get(evaluation.name, 0.0) + time.perf_counter() - t
    timings["total"] = time.perf_counter() - started

    metrics = {"eval/parameters": float(sum(p.numel() for p in lm.model.parameters()))}
    for part in parts.values():
        metrics.update(part.metrics)
    metrics["eval/seconds"] = timings["total"]
    figures = [path for part in parts.values() for path in part.figures]
    item_files = write_items([part.items for part in parts.values()], out_dir)
    rep = {"model_dir": str(model_dir), "device": str(lm.device), "max_length": lm.max_length, "seed": seed,
           **({"precision": precision} if precision != "auto" else {}),
           "config": cfg.dump() if isinstance(cfg, ConfigView) else cfg.model_dump(mode="json"),
           **{name: part.report for name, part in parts.items()},
           "timings": timings, "metrics": metrics, "plots": [p.name for p in figures]}
    markdown = [(e.name, e.markdown) for e in EVALUATIONS if e.markdown]
    return {"metrics": metrics, "plots": figures, "items": item_files, "report_json": report.write_json(rep, out_dir / "report.json"),
            "report_md": report.write_markdown(rep, out_dir / "report.md", markdown)}


def write_items(parts: list[dict], out_dir: Path) -> list[Path]:
    """The sections' per-item values: items.json, and the token-level values (one entry per scored test token)
    as items_tokens.npz (plain arrays; a top-level Parquet file would be taken for a data split). Read by a
    study to resample the measured items (tasks/lib/study/items.py)."""
    merged: dict = {}
    tokens = None
    for items in parts:
        for key, value in items.items():
            if key == "tokens":
                tokens = value
            else:
                merged.setdefault(key, {}).update(value)
    written = []
    if tokens is not None:
        path = out_dir / "items_tokens.npz"
        with path.open("wb") as handle:
            np.savez_compressed(handle, doc=np.asarray(tokens["doc"], dtype=np.int32),
                                confidence=np.asarray(tokens["confidence"], dtype=np.float32),
                                correct=np.asarray(tokens["correct"], dtype=bool))
        written.append(path)
    if merged:
        written.append(report.write_json(merged, out_dir / "items.json"))
    return written


def inputs_of(lm: LoadedModel, cfg: EvaluateConfig | ConfigView, splits: dict[str, list[dict]], seed: int | None,
              out_dir: Path, prepared: dict) -> Inputs:
    """What every section reads, with the one scoring pass over the test split that perplexity, token
    calibration and the kNN-LM queries share (the kNN-LM keys are captured only while it is on)."""
    window = min(cfg.perplexity.window or lm.max_length, lm.max_length)
    stride = min(cfg.perplexity.stride or window, window)
    test = splits["test"]
    test_docs = test[: cfg.perplexity.max_documents] if cfg.perplexity.max_documents else test
    test_scores = perplexity.score_documents(lm, lm.encode([d["text"] for d in test_docs]), window, stride,
                                             cfg.perplexity.batch_tokens, key=cfg.knnlm.key if cfg.knnlm.enabled else None)
    return Inputs(lm, cfg, splits, test_docs, test_scores, window, stride, seed, out_dir, prepared)


def read_documents(paths: list[Path]) -> list[dict]:
    """Documents (id, text, source) of Parquet shards, in the given file order."""
    docs = []
    for path in paths:
        table = pq.read_table(path)
        columns = [c for c in ("id", "text", "source") if c in table.column_names]
        for row in table.select(columns).to_pylist():
            if row.get("text"):
                row.setdefault("source", "")
                row.setdefault("id", str(len(docs)))
                docs.append(row)
    return docs
