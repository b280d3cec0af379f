"""pretrain: a causal LM trained from scratch (or from `model.init_from`) on next-token prediction.

Input: the tokenize artifact (tokenizer + packed token streams). Output: model/, a Hugging Face
directory (config, model.safetensors, tokenizer, generation config) that loads offline with the
Auto classes; loss_curve.png; the training report in the manifest. MLflow gets the curves (loss,
val_loss, lr, grad_norm, tokens/s, MFU) while training, the validation loss of the initial model
(`val_loss_before`: for model.init_from, the base model's loss on this corpus), the model as an artifact and a registered
model version.

Checkpoints go to data/pretrain/.work-<key>/checkpoints/ every `checkpoint_every` steps; rerunning an
interrupted stage resumes from the latest one and ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field, model_validator

from jielong.models.presets import build_model, count_parameters, load_model, model_config
from jielong.models.tokenizer import load_tokenizer
from jielong.models.config import MODEL_SHAPE, TrainConfig, shape_overrides
from jielong.tasks.core.schema import KEYED_WHEN_SET, NO_OUTPUT, UserError
from jielong.tasks.core.contract import Stage, StageContext, StageResult
from jielong.tasks.lib.model_card import base_model, write_card
from jielong.models.imports import import_model
from jielong.tasks.tokenize import init_from_fingerprint
from jielong.tasks.lib.training import fit



# ---------------------------------------------------------------- config section


class PretrainConfig(TrainConfig):
    register_as: str | None = Field("jielong-pretrain", description="MLflow registered model name (null: do not register)",
                                    json_schema_extra=NO_OUTPUT)
    flops_budget: float | None = Field(None, gt=0, description="train for the steps this compute allows, C = 6·N·D "
                                       "(models/flops.py), instead of `steps`", json_schema_extra=KEYED_WHEN_SET)

    @model_validator(mode="after")
    def _budget_sets_the_steps(self) -> "PretrainConfig":
        # with a budget, `steps` cannot change the model: a changed one would only move the key
        default = type(self).model_fields["steps"].default
        if self.flops_budget is not None and self.steps != default:
            raise ValueError(f"pretrain.flops_budget sets the number of steps, so pretrain.steps cannot change the "
                             f"model: leave it at its default ({default}), e.g. --set pretrain.steps={default}")
        return self


if TYPE_CHECKING:
    from jielong.models.train import TrainReport

VERSION = "5"  # 4: model/README.md, the model card; 5: train_flops, tokens_per_parameter, epochs


def save_hf_model(model, tokenizer, out: Path, max_new_tokens: int = 64) -> None:
    from transformers import GenerationConfig

    model = model.to("cpu")
    model.generation_config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))


def plot_curves(report: TrainReport, path: Path, title: str, reference: dict[str, float] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in report.curves.items():
        if points:
            ax.plot(*zip(*points), label=name, marker="o" if name == "val_loss" else None, markersize=3)
    for name, value in (reference or {}).items():
        ax.axhline(value, linestyle="--", color="gray", linewidth=1)
        ax.annotate(name, (0, value), textcoords="offset points", xytext=(4, 3), fontsize=8, color="gray")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report_metrics(report: TrainReport, n_params: int) -> dict[str, float]:
    return {
        "final_train_loss": report.final_train_loss,
        "final_val_loss": report.final_val_loss,
        "val_perplexity": math.exp(min(report.final_val_loss, 50)),
        "tokens_per_s": report.tokens_per_s,
        "mfu": report.mfu,
        "train_seconds": report.seconds,
        "parameters": n_params,
        "resumed_from_step": report.resumed_from,
    }


def compute_metrics(model, tokens_seen: int, corpus_tokens: int | None = None) -> dict[str, float]:
    """The training compute (C = 6·N·D, models/flops.py) and where it went: tokens per parameter, and
    epochs of the corpus when its size in tokens is given."""
    from jielong.models.flops import training_flops

    n_params = count_parameters(model)
    embedding = model.get_input_embeddings().weight.numel()
    metrics = {"train_flops": training_flops(n_params, tokens_seen), "tokens_seen": tokens_seen,
               "non_embedding_parameters": n_params - embedding, "tokens_per_parameter": tokens_seen / n_params}
    if corpus_tokens:
        metrics["epochs"] = tokens_seen / corpus_tokens
    return metrics


def run(ctx: StageContext) -> StageResult:
    from jielong.models.data import batches_from_spec  # torch: imported when the stage runs, not on a cache hit
    from jielong.models.flops import steps_for_budget
    from jielong.models.train import evaluate, loss_detail, resolve_device, resolve_precision

    tokenized = ctx.inputs["tokenize"]
    model_cfg, settings = ctx.section("model"), ctx.section("pretrain")
    tokenizer = load_tokenizer(tokenized.path / "tokenizer")
    details = tokenized.manifest["details"]
    context = details["context_length"]
    base_folder = import_model(model_cfg.init_from, ctx.workspace) if model_cfg.init_from else None
    if base_folder is not None:
        model = load_model(base_folder)
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
    else:
        config = model_config(model_cfg.preset, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                              tokenizer.pad_token_id, context, shape_overrides(model_cfg.dump()))
        model = build_model(config, settings.seed)
    token_files = {s: tokenized.path / "tokens" / f"{s}.bin" for s in ("train", "validation")}
    spec = {"kind": "packed", **{s: str(path) for s, path in token_files.items()}, "dtype": details["dtype"],
            "context": context, "batch_size": settings.batch_size, "grad_accum": settings.grad_accum,
            "seed": settings.seed, "eval_batches": settings.eval_batches}
    try:
        batches = batches_from_spec(spec)
    except ValueError as err:
        raise UserError(f"pretrain: {err}; use a larger corpus or a smaller model.context_length") from None
    n_params = count_parameters(model)
    if settings.flops_budget is not None:  # the budget sets the steps, and with them the schedule's length
        tokens_per_step = settings.batch_size * settings.grad_accum * context
        settings = settings.model_copy(update={"steps": steps_for_budget(settings.flops_budget, n_params, tokens_per_step)})
    device = resolve_device(settings.device)
    before = evaluate(model.to(device), batches.validation(), device, resolve_precision(settings.precision, device))
    report = fit(ctx, model, batches, lambda folder: spec, settings, "pretrain")
    save_hf_model(model, tokenizer, ctx.out_dir / "model")
    entropy = tokenized.manifest["metrics"]["unigram_entropy_nats"]
    title = f"continued pretraining of {model_cfg.init_from}" if model_cfg.init_from else f"pretrain ({model_cfg.preset})"
    plot_curves(report, ctx.out_dir / "loss_curve.png", title, {"unigram entropy": entropy, "val loss before": before})
    result = StageResult(model_dir="model", register_as=settings.register_as, extra_artifacts=["loss_curve.png"])
    result.metrics.update(report_metrics(report, n_params), unigram_entropy_nats=entropy,
                          train_tokens=len(batches.train), val_loss_before=before,
                          **compute_metrics(model, report.tokens, len(batches.train)))
    result.details.update(device=report.device, precision=report.precision, **loss_detail(report), context_length=context,
                          steps=report.steps, tokens_seen=report.tokens)
    write_card(ctx, model, base_model(model_cfg.init_from, base_folder),
               {**result.metrics, "tokens_seen": report.tokens, "device": report.device, "precision": report.precision})
    return result


def reads(cfg) -> tuple[str, ...]:
    """The architecture comes from the preset, or from the init_from checkpoint (then the preset is not
    read); the context length comes from the tokenize artifact."""
    shape = tuple(path for path in MODEL_SHAPE if getattr(cfg.model, path.split(".")[1]) is not None)
    model = ("model.init_from",) if cfg.model.init_from else ("model.preset", "model.init_from", *shape)
    return (*model, "pretrain")


STAGE = Stage(name="pretrain", version=VERSION, reads=reads, inputs=("tokenize",), run=run,
              external=init_from_fingerprint)
