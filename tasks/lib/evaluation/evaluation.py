"""Runs every evaluation of one model (see the package docstring)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from jielong.tasks.core.contract import ConfigView
from jielong.tasks.lib.evaluation import calibration, icl, knnlm, memorization, perplexity, plots, report
from jielong.tasks.lib.evaluation.config import EvaluateConfig, ExtraEvalSet
from jielong.tasks.lib.evaluation.model import LoadedModel, load
from jielong.tasks.core.schema import UserError

def evaluate_model(model_dir: Path, data: dict[str, list[Path]], cfg: EvaluateConfig | ConfigView, out_dir: Path,
                   seed: int | None = 1234, device: str = "auto") -> dict:
    """Evaluate one local Hugging Face causal LM. `data` maps 'train'/'validation'/'test' to Parquet
    files (columns id, text, source). `cfg` is the evaluate section, or the stage's view of it (which
    holds only what the enabled evaluations read); `seed` may be None when no in-context or kNN-LM
    evaluation draws. Writes out_dir/report.json, report.md and PNG plots; returns
    {"metrics": {flat name: float}, "plots": [Path], "report_json": Path, "report_md": Path}."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if seed is not None:
        torch.manual_seed(seed)
    timings: dict[str, float] = {}
    lm = load(model_dir, device, cfg.max_length)
    splits = {name: read_documents(paths) for name, paths in data.items()}
    test = splits.get("test", [])
    if not test:
        raise UserError("evaluate: the test split is empty")
    tasks = load_tasks(cfg, splits, seed) if cfg.icl.enabled else []
    metrics: dict[str, float] = {"eval/parameters": float(sum(p.numel() for p in lm.model.parameters()))}
    figures: list[Path] = []
    rep: dict = {"model_dir": str(model_dir), "device": str(lm.device), "max_length": lm.max_length, "seed": seed,
                 "config": cfg.dump() if isinstance(cfg, ConfigView) else cfg.model_dump(mode="json")}

    window = min(cfg.perplexity.window or lm.max_length, lm.max_length)
    stride = min(cfg.perplexity.stride or window, window)
    t = time.perf_counter()
    key = cfg.knnlm.key if cfg.knnlm.enabled else None
    test_docs = test[: cfg.perplexity.max_documents] if cfg.perplexity.max_documents else test
    test_scores = perplexity.score_documents(lm, lm.encode([d["text"] for d in test_docs]), window, stride,
                                             cfg.perplexity.batch_tokens, key=key)
    if cfg.perplexity.enabled:
        rep["perplexity"] = _perplexity(lm, cfg, test_docs, test_scores, window, stride, metrics,
                                        splits.get("validation", []))
    timings["perplexity"] = time.perf_counter() - t

    if cfg.calibration.enabled:
        t = time.perf_counter()
        rep["calibration"] = _token_calibration(cfg, test_scores, out_dir, metrics, figures)
        timings["calibration"] = time.perf_counter() - t

    if cfg.icl.enabled and cfg.icl.tasks:
        t = time.perf_counter()
        rep["icl"] = _icl(lm, cfg, tasks, seed, out_dir, metrics, figures)
        timings["icl"] = time.perf_counter() - t

    if cfg.knnlm.enabled:
        t = time.perf_counter()
        rep["knnlm"] = _knnlm(lm, cfg, splits, test_scores, window, stride, seed, out_dir, metrics, figures)
        timings["knnlm"] = time.perf_counter() - t

    if cfg.memorization.enabled:
        t = time.perf_counter()
        try:
            rep["memorization"] = memorization.evaluate(lm, splits, cfg.memorization, cfg.perplexity.batch_tokens, metrics)
        except ValueError as err:
            raise UserError(str(err)) from None
        timings["memorization"] = time.perf_counter() - t

    timings["total"] = time.perf_counter() - started
    metrics["eval/seconds"] = timings["total"]
    rep["timings"] = timings
    rep["metrics"] = metrics
    rep["plots"] = [p.name for p in figures]
    return {"metrics": metrics, "plots": figures, "report_json": report.write_json(rep, out_dir / "report.json"),
            "report_md": report.write_markdown(rep, out_dir / "report.md")}


# ---------------------------------------------------------------- inputs


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


def read_extra(extra: ExtraEvalSet) -> list[dict]:
    """Documents of an extra eval set: a file or folder read by the shared reader (parquet, jsonl, json,
    csv/tsv by `text_field`; text files split by `text_unit`), or a datasets.save_to_disk folder.
    Unreadable records are an error: a perplexity over a silently smaller set would mislead."""
    from jielong.tasks.lib.sources.reader import FileOptions, read_documents

    root = Path(extra.path).expanduser()
    if not root.exists():
        raise UserError(f"evaluate.perplexity.extra {extra.name!r}: {root} does not exist")
    if root.is_dir() and ((root / "dataset_info.json").exists() or (root / "dataset_dict.json").exists()):
        import datasets

        ds = datasets.load_from_disk(str(root))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[next(iter(ds))]
        texts = [t for t in ds[extra.text_field] if t]
        docs = [{"id": f"{extra.name}:{i}", "text": t, "source": extra.name} for i, t in enumerate(texts)]
        return docs[: extra.max_documents]
    docs, bad = [], []
    for item in read_documents(root, FileOptions(text_unit=extra.text_unit), extra.text_field):
        if "reason" in item:
            bad.append(f"{item['id']}: {item['reason']} {item['detail']}".strip())
        elif item["text"].strip():
            docs.append({"id": item["id"], "text": item["text"], "source": item["source"]})
    if bad:
        raise UserError(f"evaluate.perplexity.extra {extra.name!r}: {len(bad)} unreadable records, e.g. {'; '.join(bad[:3])}")
    return docs[: extra.max_documents]


# ---------------------------------------------------------------- sections


def _perplexity(lm: LoadedModel, cfg: EvaluateConfig, docs: list[dict], scores, window: int, stride: int,
                metrics: dict, validation: list[dict]) -> dict:
    pcfg = cfg.perplexity
    result = perplexity.perplexity_metrics(scores, [d["text"] for d in docs], [d["source"] for d in docs], pcfg.source_depth)
    for name in ("perplexity", "bits_per_byte", "word_perplexity", "nll_per_token", "tokens", "bytes", "words", "documents"):
        metrics[f"eval/{name}"] = result.overall[name]
    metrics["eval/tokens_per_s"] = result.tokens_per_s
    for group, summary in result.by_source.items():
        for name in ("perplexity", "bits_per_byte"):
            metrics[f"eval/by_source/{group}/{name}"] = summary[name]
    section = {"window": window, "stride": stride, "source_depth": pcfg.source_depth, "test": result.overall,
               "by_source": result.by_source, "seconds": result.seconds, "tokens_per_s": result.tokens_per_s, "extra": {}}
    extra_sets = [(extra.name, lambda extra=extra: read_extra(extra)) for extra in pcfg.extra]
    if pcfg.validation:
        if not validation:
            raise UserError("evaluate.perplexity.validation: the validation split is empty (split.validation = 0?)")
        extra_sets.insert(0, ("validation", lambda: validation[: pcfg.max_documents] if pcfg.max_documents else validation))
    for name, read in extra_sets:
        extra_docs = read()
        extra_scores = perplexity.score_documents(lm, lm.encode([d["text"] for d in extra_docs]), window, stride, pcfg.batch_tokens)
        summary = perplexity.perplexity_metrics(extra_scores, [d["text"] for d in extra_docs], [d["source"] for d in extra_docs], 1)
        section["extra"][name] = summary.overall
        for metric in ("perplexity", "bits_per_byte", "word_perplexity"):
            metrics[f"eval/{name}/{metric}"] = summary.overall[metric]
    return section


def _token_calibration(cfg: EvaluateConfig, scores, out_dir: Path, metrics: dict, figures: list) -> dict:
    ccfg = cfg.calibration
    summary = calibration.calibration_metrics(scores.confidence, scores.correct, scores.brier,
                                              ccfg.equal_mass_bins, ccfg.equal_width_bins)
    summary = _rename_width(summary, ccfg.equal_width_bins)
    for name, value in summary.items():
        metrics[f"eval/{name}"] = value
    metrics["eval/ece"] = summary[f"ece_{ccfg.equal_mass_bins}_bin"]
    rel = calibration.reliability(scores.confidence, scores.correct, ccfg.equal_width_bins)
    shown = {k: v for k, v in summary.items() if k.startswith("ece") or k == "brier"}
    figures.append(plots.reliability_diagram([("next-token confidence (test)", rel, shown)], out_dir / "reliability_tokens.png"))
    return {"token": summary, "reliability": rel.__dict__}


def _rename_width(summary: dict, bins: int) -> dict:
    """ece_<n>_bin_width -> ece_<n>_bin_equal_width, the name used everywhere in the report."""
    return {(f"ece_{bins}_bin_equal_width" if k == f"ece_{bins}_bin_width" else k): v for k, v in summary.items()}


def load_tasks(cfg: EvaluateConfig, splits: dict, seed: int) -> list[tuple[icl.TaskSpec, icl.Task]]:
    """Every in-context task, loaded and checked before any scoring starts (a mistake fails in seconds)."""
    heldout = {name: splits.get(name, []) for name in ("test", "validation")}
    tasks = []
    for name in cfg.icl.tasks:
        try:
            spec, base = icl.load_spec(name)
            task = icl.load_task(spec, base, heldout, cfg.icl.max_examples, seed)
        except (OSError, ValueError, KeyError) as err:  # a missing or malformed spec or data file
            raise UserError(f"in-context task {name!r}: {err}") from None
        if task.examples:
            icl.check_shots(task, cfg.icl.shots)
        tasks.append((spec, task))
    return tasks


def _icl(lm: LoadedModel, cfg: EvaluateConfig, tasks: list, seed: int, out_dir: Path, metrics: dict, figures: list) -> dict:
    icfg, ccfg = cfg.icl, cfg.calibration
    seeds = [seed + i for i in range(icfg.num_seeds)]
    section: dict = {"tasks": {}, "skipped": {}}
    panels = []
    for spec, task in tasks:
        if not task.examples:
            section["skipped"][spec.name] = "no examples (a built-in task needs the built-in corpus's held-out documents)"
            continue
        result = icl.evaluate_task(lm, task, icfg.shots, list(icfg.modes), seeds, icfg.pack_tokens, icfg.batch_rows,
                                   ccfg.equal_mass_bins, ccfg.equal_width_bins, icfg.leading_eos)
        metrics.update(icl.task_metrics(result))
        section["tasks"][spec.name] = {
            "description": spec.description, "chance": spec.chance, "chance_note": spec.chance_note,
            "n_examples": result.n_examples, "n_pool": result.n_pool, "table": result.table,
            "answer_calibration": result.answer_calibration,
        }
        figures.append(plots.accuracy_vs_k(spec.name, result.table, spec.chance, out_dir / f"icl_{spec.name}.png"))
        rel = calibration.reliability(result.confidence, result.correct, ccfg.equal_width_bins)
        section["tasks"][spec.name]["reliability"] = rel.__dict__
        panels.append((spec.name, rel, {k: v for k, v in result.answer_calibration.items() if k.startswith("ece")}))
    if panels:
        figures.append(plots.reliability_diagram(panels, out_dir / "reliability_answers.png"))
    return section


def _knnlm(lm: LoadedModel, cfg: EvaluateConfig, splits: dict, test_scores, window: int, stride: int, seed: int,
           out_dir: Path, metrics: dict, figures: list) -> dict:
    kcfg = cfg.knnlm
    train = _shuffled_prefix(lm, splits.get("train", []), kcfg.max_train_tokens, seed)
    if not train:
        return {"skipped": "empty train split"}
    t = time.perf_counter()
    train_scores = perplexity.score_documents(lm, train, window, stride, cfg.perplexity.batch_tokens, key=kcfg.key,
                                              with_logits=False)
    forward_seconds = time.perf_counter() - t
    val = _token_prefix(lm, splits.get("validation", []), kcfg.tune_max_tokens)
    val_scores = perplexity.score_documents(lm, val, window, stride, cfg.perplexity.batch_tokens, key=kcfg.key) if val else None

    store = knnlm.build_datastore(train_scores.keys, train_scores.target, kcfg, seed)
    t = time.perf_counter()
    test_nb = knnlm.search(store, test_scores.keys, kcfg.k, kcfg.batch_queries)
    search_seconds = time.perf_counter() - t
    tuned = _tune(store, val_scores, kcfg) if val_scores is not None else None
    lam, temp = (tuned.lam, tuned.temperature) if tuned else (0.0, 1.0)
    t = time.perf_counter()
    knn_lp = knnlm.interpolate(test_scores.logprob, knnlm.knn_logprob(test_nb, test_scores.target, temp), lam)
    mix_seconds = time.perf_counter() - t
    base_ppl, knn_ppl = knnlm.perplexity_of(test_scores.logprob), knnlm.perplexity_of(knn_lp)
    n_test = len(test_scores.logprob)
    section = {
        "key": kcfg.key, "key_dim": int(train_scores.keys.shape[1]), "k": kcfg.k, "index": store.kind,
        "datastore_size": int(len(store.values)), "lambda": lam, "temperature": temp,
        "validation_tokens": int(len(val_scores.logprob)) if val_scores else 0,
        "validation_base_perplexity": tuned.val_base_perplexity if tuned else None,
        "validation_knnlm_perplexity": tuned.val_perplexity if tuned else None,
        "base_perplexity": base_ppl, "knnlm_perplexity": knn_ppl, "perplexity_ratio": knn_ppl / base_ppl,
        "datastore_forward_seconds": forward_seconds, "index_build_seconds": store.build_seconds,
        "datastore_build_seconds": forward_seconds + store.build_seconds,
        "test_forward_seconds": test_scores.seconds, "test_search_seconds": search_seconds + mix_seconds,
        "tokens_per_s_base": n_test / test_scores.seconds,
        "tokens_per_s_knnlm": n_test / (test_scores.seconds + search_seconds + mix_seconds),
        "grid": tuned.grid if tuned else [],
    }
    for name in ("base_perplexity", "knnlm_perplexity", "perplexity_ratio", "lambda", "temperature", "datastore_size",
                 "datastore_build_seconds", "tokens_per_s_base", "tokens_per_s_knnlm"):
        metrics[f"eval/knnlm_{name}" if not name.startswith("knnlm") else f"eval/{name}"] = float(section[name])
    section["sweep"] = _sweep(train_scores, val_scores, test_scores, kcfg, seed, store, knn_ppl, lam, temp) if val_scores else []
    for row in section["sweep"]:
        metrics[f"eval/knnlm_sweep/{int(round(row['fraction'] * 100))}pct/perplexity"] = row["test_perplexity"]
    if section["sweep"]:
        figures.append(plots.knnlm_size_sweep(section["sweep"], base_ppl, out_dir / "knnlm_size_sweep.png"))
    return section


def _tune(store: knnlm.Datastore, val_scores, kcfg) -> knnlm.Tuned:
    nb = knnlm.search(store, val_scores.keys, kcfg.k, kcfg.batch_queries)
    return knnlm.tune(val_scores.logprob, nb, val_scores.target, kcfg.lambdas, kcfg.temperatures)


def _sweep(train_scores, val_scores, test_scores, kcfg, seed: int, full: knnlm.Datastore, full_ppl: float,
           full_lam: float, full_temp: float) -> list[dict]:
    """Test perplexity with datastores of the first fraction of the (shuffled) train tokens; lambda
    and T re-chosen on validation for each size."""
    rows = []
    n = len(train_scores.target)
    for fraction in sorted(set(kcfg.sweep)):
        size = max(1, int(round(fraction * n)))
        if size == n:
            rows.append({"fraction": fraction, "size": n, "index": full.kind, "lambda": full_lam,
                         "temperature": full_temp, "test_perplexity": full_ppl})
            continue
        store = knnlm.build_datastore(train_scores.keys[:size], train_scores.target[:size], kcfg, seed)
        tuned = _tune(store, val_scores, kcfg)
        nb = knnlm.search(store, test_scores.keys, kcfg.k, kcfg.batch_queries)
        lp = knnlm.interpolate(test_scores.logprob, knnlm.knn_logprob(nb, test_scores.target, tuned.temperature), tuned.lam)
        rows.append({"fraction": fraction, "size": size, "index": store.kind, "lambda": tuned.lam,
                     "temperature": tuned.temperature, "test_perplexity": knnlm.perplexity_of(lp)})
    return rows


def _shuffled_prefix(lm: LoadedModel, docs: list[dict], max_tokens: int | None, seed: int) -> list[list[int]]:
    """Token ids of train documents in a seeded shuffle, up to max_tokens (the last one cut)."""
    order = np.random.default_rng(seed).permutation(len(docs))
    return _token_prefix(lm, [docs[i] for i in order], max_tokens)


def _token_prefix(lm: LoadedModel, docs: list[dict], max_tokens: int | None) -> list[list[int]]:
    out, total = [], 0
    step = 512
    for s in range(0, len(docs), step):
        for ids in lm.encode([d["text"] for d in docs[s : s + step]]):
            if max_tokens is not None and total + len(ids) > max_tokens:
                if max_tokens - total > 0:
                    out.append(ids[: max_tokens - total])
                return out
            out.append(ids)
            total += len(ids)
    return out
