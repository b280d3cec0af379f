"""The evaluation report: report.json (everything) and report.md (a readable summary)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Callable


def _clean(value):
    """JSON-safe: NaN/inf become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(report: dict, path: Path) -> Path:
    path.write_text(json.dumps(_clean(report), indent=2, sort_keys=False, default=str), encoding="utf-8")
    return path


def _f(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return f"{int(value):,}"  # counts
    if isinstance(value, float):
        return f"{value:,.{digits}f}" if abs(value) < 1e6 else f"{value:.3e}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_f(v) for v in row) + " |" for row in rows]
    return lines + [""]


def write_markdown(report: dict, path: Path, sections: list[tuple[str, Callable[[dict], list[str]]]]) -> Path:
    """The header, then each (name, render) of `sections` whose part the report holds."""
    lines = [f"# Evaluation of `{report['model_dir']}`", ""]
    lines += [f"- Device: {report['device']}; context {report['max_length']} tokens; "
              f"{'seed ' + str(report['seed']) if report['seed'] is not None else 'no seeded draws'}",
              f"- Total time: {report['timings'].get('total', 0):.1f} s "
              f"({', '.join(f'{k} {v:.1f} s' for k, v in report['timings'].items() if k != 'total')})", ""]
    for name, render in sections:
        if report.get(name):
            lines += render(report[name])
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def perplexity_markdown(ppl: dict) -> list[str]:
    lines = ["## Perplexity", "", f"Window {ppl['window']} tokens, stride {ppl['stride']}; each document scored "
             "after one end-of-text token.", ""]
    rows = [[name, s["documents"], s["tokens"], s["perplexity"], s["bits_per_byte"], s["word_perplexity"]]
            for name, s in [("test", ppl["test"])] + list(ppl.get("extra", {}).items())]
    lines += _table(["set", "documents", "tokens", "token perplexity", "bits per byte", "word perplexity"], rows)
    by_source = sorted(ppl["by_source"].items(), key=lambda kv: -kv[1]["tokens"])
    lines += [f"By source (first {ppl['source_depth']} path components; largest 15 of {len(by_source)}):", ""]
    lines += _table(["source", "documents", "tokens", "token perplexity", "bits per byte"],
                    [[g, s["documents"], s["tokens"], s["perplexity"], s["bits_per_byte"]] for g, s in by_source[:15]])
    return lines


def calibration_markdown(cal: dict) -> list[str]:
    lines = ["## Calibration (token level)", "",
             "Confidence = the top next-token probability; correct = it is the actual next token.", ""]
    lines += _table(list(cal["token"].keys()), [list(cal["token"].values())])
    lines += ["![reliability](reliability_tokens.png)", ""]
    return lines


def icl_markdown(icl: dict) -> list[str]:
    lines = ["## In-context accuracy", "",
             "Scored by log-likelihood of each choice; acc_norm divides by the choice's characters, acc_bytes by its UTF-8 bytes "
             "(lm-evaluation-harness's names). "
             "Modes: gold labels, random labels, no labels (inputs only); k = 0 is shared. Mean ± std over seeds; "
             "k used = mean number of demonstrations that fit the context.", ""]
    for name, task in icl["tasks"].items():
        if task["table"] and "acc" not in task["table"][0]:  # a harness loglikelihood_rolling task: whole documents
            lines += _rolling_markdown(name, task)
            continue
        bins = _mass_bins(task["answer_calibration"])
        lines += [f"### {name}", "", f"{task['description']} {task['n_examples']} scored examples, "
                  f"{task['n_pool']} in the demonstration pool; chance {task['chance']:.3f} ({task['chance_note']}).", ""]
        own = _own_metrics(task["table"][0], bins)
        rows = [[r["mode"], r["k"], r["k_used"], f"{r['acc']:.3f} ± {r['acc_std']:.3f}",
                 f"{r['acc_norm']:.3f} ± {r['acc_norm_std']:.3f}", f"{r['acc_bytes']:.3f}", f"{r['macro_f1']:.3f}", r[f"ece_{bins}_bin"],
                 *[r[m] for m in own]] for r in task["table"]]
        lines += _table(["mode", "k", "k used", "acc", "acc_norm", "acc_bytes", "macro-F1", f"answer ECE ({bins} bins)", *own], rows)
        lines += [f"Answer-level calibration over all settings: ECE ({bins} equal-mass bins) "
                  f"{_f(task['answer_calibration'][f'ece_{bins}_bin'])}.", "",
                  f"![{name}](icl_{name}.png)", ""]
    for name, group in icl.get("groups", {}).items():
        metrics = [m for m in group["metrics"] if any(m in r for r in group["table"])]
        lines += [f"### group {name}", "", f"lm-evaluation-harness group: the mean of its tasks' metrics "
                  f"({', '.join(f'`{t}`' for t in group['tasks'])}), weighted by their examples as its "
                  "aggregate_metric_list says.", ""]
        lines += _table(["mode", "k", "examples", *metrics], [[r["mode"], r["k"], r["examples"], *[r.get(m) for m in metrics]]
                                                             for r in group["table"]])
    if any(not task["table"] or "acc" in task["table"][0] for task in icl["tasks"].values()):
        lines += ["![answer reliability](reliability_answers.png)", ""]
    lines += [f"Skipped `{name}`: {why}." for name, why in icl.get("skipped", {}).items()]
    return lines + ([""] if icl.get("skipped") else [])


def _own_metrics(row: dict, bins: int) -> list[str]:
    """A harness task's metrics from its metric_list beyond jielong's columns (f1, mcc, perplexity, ...)."""
    shown = {"mode", "k", "seeds", "k_used", "per_seed_acc", "acc", "acc_norm", "acc_bytes", "macro_f1", f"ece_{bins}_bin"}
    return [m for m, v in row.items() if m not in shown and not m.endswith("_std") and not m.startswith("ece_")
            and isinstance(v, float)]


def _rolling_markdown(name: str, task: dict) -> list[str]:
    """A harness loglikelihood_rolling task: its own metrics of whole documents."""
    row = task["table"][0]
    metrics = [m for m in row if m not in ("mode", "k", "seeds", "k_used")]
    lines = [f"### {name}", "", f"{task['description']} {task['n_examples']} documents, each scored whole in the "
             "model's context windows (as the harness's rolling log-likelihood); the task's own metrics.", ""]
    return lines + _table(metrics, [[row[m] for m in metrics]])


def _mass_bins(calibration: dict) -> int:
    """The number of equal-mass bins of an answer calibration (evaluate.calibration.equal_mass_bins)."""
    return next(int(name.split("_")[1]) for name in calibration if re.fullmatch(r"ece_\d+_bin", name))


def knnlm_markdown(knn: dict) -> list[str]:
    if "skipped" in knn:
        return ["## kNN-LM", "", f"Skipped: {knn['skipped']}.", ""]
    lines = ["## kNN-LM", "",
             f"Datastore: {knn['datastore_size']:,} train tokens, key `{knn['key']}` (dim {knn['key_dim']}), "
             f"index {knn['index']}, k = {knn['k']}. lambda = {knn['lambda']}, T = {knn['temperature']:.4g} "
             "chosen on validation.", ""]
    lines += _table(["", "test perplexity", "eval tokens/s"],
                    [["base LM", knn["base_perplexity"], knn["tokens_per_s_base"]],
                     ["kNN-LM", knn["knnlm_perplexity"], knn["tokens_per_s_knnlm"]]])
    lines += [f"Ratio kNN-LM / base: {knn['perplexity_ratio']:.4f}. Datastore build: {knn['datastore_forward_seconds']:.2f} s "
              f"forward + {knn['index_build_seconds']:.2f} s index.", ""]
    if knn.get("sweep"):
        lines += _table(["fraction", "entries", "index", "lambda", "T", "test perplexity"],
                        [[r["fraction"], r["size"], r["index"], r["lambda"], r["temperature"], r["test_perplexity"]]
                         for r in knn["sweep"]])
        lines += ["![sweep](knnlm_size_sweep.png)", ""]
    return lines
