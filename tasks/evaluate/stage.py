"""The evaluate stages: one per model (eval_pretrain, eval_instruct), each its own cached artifact and
MLflow run with every metric, the plots and the report (report.json + report.md).

Data: the dedup artifact's splits — the kNN-LM datastore from train, λ and T tuned on validation,
everything reported on test (documents no training stage has seen).
"""

from __future__ import annotations

from pathlib import Path

from tasks.contract import Stage, StageContext, StageResult, file_fingerprint

VERSION = "1"
SPLITS = ("train", "validation", "test")


def evaluate_into(model_dir: Path, data, ctx_config, out_dir: Path) -> StageResult:
    from tasks.evaluate import evaluate_model

    outcome = evaluate_model(model_dir, {s: data.files(s) for s in SPLITS}, ctx_config.evaluate, out_dir,
                             seed=ctx_config.seed, device=ctx_config.pretrain.device)
    result = StageResult(extra_artifacts=[p.name for p in outcome["plots"]] + ["report.json", "report.md"])
    result.metrics.update({name.removeprefix("eval/"): value for name, value in outcome["metrics"].items()})
    return result


def make_stage(model_stage: str) -> Stage:
    def run(ctx: StageContext) -> StageResult:
        return evaluate_into(ctx.inputs[model_stage].path / "model", ctx.inputs["dedup"], ctx.config, ctx.out_dir)

    return Stage(name=f"eval_{model_stage}", version=VERSION, sections=("evaluate",),
                 inputs=(model_stage, "dedup"), run=run)


EVAL_PRETRAIN = make_stage("pretrain")
EVAL_INSTRUCT = make_stage("instruct")


def external_stage(model_dir: Path, label: str) -> Stage:
    """`jielong eval --model ...`: the same evaluation for any local Hugging Face causal LM, cached by
    the model's files (path, size, mtime) and the evaluate config."""

    def run(ctx: StageContext) -> StageResult:
        return evaluate_into(model_dir, ctx.inputs["dedup"], ctx.config, ctx.out_dir)

    return Stage(name="eval_model", version=VERSION, sections=("evaluate",), inputs=("dedup",), run=run,
                 extra_key=lambda cfg: [label, file_fingerprint([model_dir])])
