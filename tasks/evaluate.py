"""The evaluate stages: one per model (eval_pretrain, eval_instruct), each its own cached artifact and
MLflow run with every metric, the plots and the report (report.json + report.md).

Data: the dedup artifact's splits — the kNN-LM datastore from train, λ and T tuned on validation,
everything reported on test (documents no training stage has seen).
"""

from __future__ import annotations

from pathlib import Path

from jielong.tasks.core.config import RunConfig
from jielong.tasks.core.contract import ConfigView, Stage, StageContext, StageResult
from jielong.tasks.core.fingerprint import fingerprint_tree
from jielong.tasks.lib.evaluation.registry import EVALUATIONS

VERSION = "7"  # 7: a sliding-window layer (Mistral, Phi-3, Gemma 2/3, Qwen2) keeps its window in packed scoring, eager attention where an architecture has no SDPA; 6: a harness task's own metric_list (f1, mcc, brier_score, exact_match, acc_mutual_info) through its process_results, several gold targets, an empty context predicted from the prefix token (BOS); 5: acc_norm divides by characters as the harness does, acc_bytes by UTF-8 bytes (was acc_norm); items.json and items_tokens.npz, the per-item values a study resamples; the kNN-LM sweep's lambda per size and its per-document nll; 4: the parameter count, each task's answer reliability bins (3: prompts tokenized whole, as lm-evaluation-harness does; 2: ids unique per file)
SPLITS = ("train", "validation", "test")


def draws(evaluate) -> bool:
    """Whether the evaluation draws at random (in-context demonstrations, the kNN-LM datastore's shuffle):
    only then does `seed` matter. `evaluate`: the config section or a stage's view of it."""
    return any(e.draws and e.enabled(evaluate) for e in EVALUATIONS)


def reads(cfg: RunConfig) -> tuple[str, ...]:
    """What an evaluation reads: each registered evaluation's settings (registry.Evaluation.reads), and
    `seed` only while an evaluation that draws is on. Sections read whole whatever their `enabled` come
    first: the order of the config in every report and manifest written so far."""
    ev = cfg.evaluate
    ordered = sorted(EVALUATIONS, key=lambda e: not e.keyed_when_set)
    return ("evaluate.device", *(["evaluate.precision"] if ev.precision != "auto" else []), "evaluate.max_length",
            *(path for e in ordered for path in e.reads(ev)),
            *(["seed"] if draws(ev) else []))


def precision(evaluate) -> str:
    """The evaluate section's precision; a view holds it only when set (`auto` stays out of the key and the
    report, which were written before the setting existed)."""
    return getattr(evaluate, "precision", "auto")


def evaluate_into(model_dir: Path, data, view: ConfigView, out_dir: Path) -> StageResult:
    from jielong.tasks.lib.evaluation import evaluate_model

    outcome = evaluate_model(model_dir, {s: data.files(s) for s in SPLITS}, view.evaluate, out_dir,
                             seed=view.seed if draws(view.evaluate) else None, device=view.evaluate.device,
                             precision=precision(view.evaluate))
    result = StageResult(extra_artifacts=[p.name for p in outcome["plots"]] + [p.name for p in outcome["items"] if p.suffix == ".json"]
                         + ["report.json", "report.md"])
    result.metrics.update({name.removeprefix("eval/"): value for name, value in outcome["metrics"].items()})
    return result


def eval_files_fingerprint(view: ConfigView) -> dict:
    """The content of every file the evaluation reads outside its inputs (each in-context task's spec and
    data files, the extra perplexity sets), by the label its evaluation declares."""
    return {e.files[0]: e.fingerprint(view.evaluate) for e in EVALUATIONS if e.files}


def make_stage(model_stage: str) -> Stage:
    def run(ctx: StageContext) -> StageResult:
        return evaluate_into(ctx.inputs[model_stage].path / "model", ctx.inputs["dedup"], ctx.config, ctx.out_dir)

    return Stage(name=f"eval_{model_stage}", version=VERSION, reads=reads, inputs=(model_stage, "dedup"), run=run,
                 external=eval_files_fingerprint)


EVAL_PRETRAIN = make_stage("pretrain")
EVAL_INSTRUCT = make_stage("instruct")


def external_stage(model_dir: Path) -> Stage:
    """`jielong eval --model ...`: the same evaluation for any local Hugging Face causal LM, cached by
    the content of the model's files and the evaluate config."""

    def run(ctx: StageContext) -> StageResult:
        return evaluate_into(model_dir, ctx.inputs["dedup"], ctx.config, ctx.out_dir)

    return Stage(name="eval_model", version=VERSION, reads=reads, inputs=("dedup",), run=run,
                 external=lambda view: {"model": fingerprint_tree(model_dir), **eval_files_fingerprint(view)})
