"""Model cards: README.md in every model folder jielong writes, in the Hugging Face format (YAML front
matter, then Markdown), so the folder explains itself wherever it is copied or served.

A training stage writes the card with what it knows when its model is made: the base model and its
licence, the data lineage (every upstream stage's key and document counts, read from the manifests),
the training settings and results, intended use and limits. The copy registered in MLflow gets the same
card plus the headline numbers of the evaluations of that model run in the same pipeline invocation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import yaml

from jielong.tasks.core.contract import Artifact, load_artifact

CARD = "README.md"
LIMITS = """\
- Made by an automated, reproducible pipeline for research and teaching: to compare data, training and
  evaluation variants side by side. It is not an assistant to deploy: it was not aligned for safety and
  its training data are whatever the lineage above names.
- A small model trained on little data states false things fluently. Check every answer; do not use it
  for medical, legal, financial or other decisions about people.
- Evaluated only on the held-out splits and tasks listed here; numbers on other data will differ."""


def front_matter(readme: Path) -> dict[str, Any]:
    """The YAML front matter of a model card (empty when there is none or it does not parse)."""
    if not readme.is_file():
        return {}
    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    try:
        data = yaml.safe_load(text[3:end]) if end > 0 else None
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def lineage(workspace: Path, inputs: dict[str, Artifact]) -> list[Artifact]:
    """Every artifact upstream of `inputs` (inputs included), oldest first."""
    found: dict[tuple[str, str], Artifact] = {}
    pending = list(inputs.values())
    while pending:
        artifact = pending.pop()
        if (artifact.stage, artifact.key) in found:
            continue
        found[(artifact.stage, artifact.key)] = artifact
        for stage, key in artifact.manifest.get("inputs", {}).items():
            upstream = load_artifact(workspace, stage, key)
            if upstream is not None:
                pending.append(upstream)
    return sorted(found.values(), key=lambda a: (a.manifest.get("created_at", ""), a.stage))


def base_model(spec: str | None, folder: Path | None) -> dict[str, Any]:
    """What a model was made from: `spec` (model.init_from) and the folder it resolved to; None = from scratch."""
    if not spec:
        return {"name": "none: trained from scratch", "license": None, "hub_id": None}
    facts: dict[str, Any] = {"name": spec, "license": None, "hub_id": None}
    if folder is not None:
        card = front_matter(folder / CARD)
        facts["license"] = card.get("license")
        facts["hub_id"] = card.get("base_model")
        imported = _import_manifest(folder / "manifest.json")  # a converted GGUF records the GGUF's own metadata
        if imported:
            facts["license"] = facts["license"] or imported.get("license")
            facts["hub_id"] = facts["hub_id"] or imported.get("hub_id")
            if imported.get("gguf_name"):
                facts["name"] = f"{spec} ({imported['gguf_name']}, from {imported.get('gguf_file', 'a GGUF file')})"
    if not facts["hub_id"] and "/" in spec and not Path(spec).expanduser().exists():
        facts["hub_id"] = spec  # a hub name
    return facts


def _import_manifest(path: Path) -> dict[str, Any]:
    """models/imports.py's manifest of a converted GGUF; {} for a folder's own, unrelated or unreadable one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and "digest" in data else {}


def _tokens_note(artifact: Artifact) -> str:
    metrics, details = artifact.manifest.get("metrics", {}), artifact.manifest.get("details", {})
    if "tokens_seen" in details:
        return f"{int(details['tokens_seen']):,} tokens trained on"
    if "train_tokens" in metrics:
        return f"{int(metrics['train_tokens']):,} train tokens"
    return ""


def _lineage_table(artifacts: list[Artifact]) -> list[str]:
    rows = ["| stage | key | documents in | out | rejected | tokens |", "| --- | --- | ---: | ---: | ---: | --- |"]
    for a in artifacts:
        c = a.manifest.get("counts", {})
        rows.append(f"| {a.stage} | `{a.key}` | {c.get('documents_in', 0):,} | {c.get('documents_out', 0):,} "
                    f"| {c.get('documents_rejected', 0):,} | {_tokens_note(a)} |")
    return rows


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def render(*, title: str, stage: str, key: str, base: dict[str, Any], model, upstream: list[Artifact],
           settings: dict[str, Any], results: dict[str, float], evaluation: list[str] | None = None) -> str:
    """The card's text. `model` is the transformers model (architecture and size are read from it)."""
    meta = {"library_name": "transformers", "pipeline_tag": "text-generation", "tags": ["jielong", stage]}
    if base.get("license"):
        meta["license"] = base["license"]
    if base.get("hub_id"):
        meta["base_model"] = base["hub_id"]
    config = model.config
    n_params = sum(p.numel() for p in model.parameters())
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=True).strip(), "---", "", f"# {title}", "",
        f"Made by the jielong `{stage}` stage (artifact key `{key}`).", "", "## Model", "",
        f"- Architecture: {config.architectures[0] if config.architectures else config.model_type}, "
        f"{n_params:,} parameters, {config.num_hidden_layers} layers, hidden size {config.hidden_size}",
        f"- Base model: {base['name']}",
        f"- Licence: {base.get('license') or 'not stated by the base model; check it before redistributing'}",
        "", "## Data lineage", "", "Each upstream stage's artifact (`data/<stage>/<key>/`), oldest first:", "",
        *_lineage_table(upstream), "", "## Training", "", "| setting | value |", "| --- | --- |",
        *(f"| {name} | {_value(value)} |" for name, value in sorted(settings.items())),
        "", "| result | value |", "| --- | ---: |",
        *(f"| {name} | {_value(value)} |" for name, value in sorted(results.items())),
    ]
    if evaluation:
        lines += ["", "## Evaluation", "", *evaluation]
    lines += ["", "## Intended use and limits", "", LIMITS, ""]
    return "\n".join(lines)


def evaluation_section(report: dict[str, Any], eval_stage: str, eval_key: str) -> list[str]:
    """Headline numbers of one evaluation report (the evaluate stages' report.json)."""
    lines = [f"From the `{eval_stage}` stage (key `{eval_key}`), on the held-out test split:", ""]
    test = (report.get("perplexity") or {}).get("test")
    if test:
        lines.append(f"- Test perplexity {test['perplexity']:.4g} ({test['bits_per_byte']:.4g} bits per byte, "
                     f"{int(test['documents'])} documents)")
    token = (report.get("calibration") or {}).get("token")
    if token:
        lines.append(f"- Next-token calibration: ECE {token['ece_10_bin']:.4g} (10 equal-mass bins), "
                     f"top-1 accuracy {token['accuracy']:.4g}")
    knn = report.get("knnlm")
    if knn and "knnlm_perplexity" in knn:
        lines.append(f"- kNN-LM: test perplexity {knn['knnlm_perplexity']:.4g} against {knn['base_perplexity']:.4g} "
                     f"without retrieval (datastore {knn['datastore_size']:,} tokens, λ={knn['lambda']:g})")
    tasks = (report.get("icl") or {}).get("tasks") or {}
    if tasks:
        lines += ["", "| in-context task | examples | chance | accuracy (mode, k) |", "| --- | ---: | ---: | --- |"]
        for name, task in sorted(tasks.items()):
            cells = ", ".join(f"{row['mode']} k={row['k']}: {row['acc']:.3f}" for row in task.get("table", []))
            lines.append(f"| {name} | {task['n_examples']} | {task['chance']:.3f} | {cells} |")
    return lines


def inherited_base(folder: Path, stage: str, key: str) -> dict[str, Any]:
    """The base of a model made from a jielong model in `folder`: that model, and its own base's licence."""
    card = front_matter(folder / CARD)
    origin = f", itself made from {card['base_model']}" if card.get("base_model") else ""
    return {"name": f"the jielong {stage} model (key `{key}`){origin}", "license": card.get("license"),
            "hub_id": card.get("base_model")}


def write_card(ctx, model, base: dict[str, Any], results: dict[str, Any]) -> None:
    """README.md in the stage's model/ folder."""
    section = ctx.section(ctx.stage.name)  # the training settings: pretrain's or instruct's section
    settings = section.model_dump(mode="json")
    title = getattr(section, "register_as", None) or f"jielong {ctx.stage.name} model"
    text = render(title=title, stage=ctx.stage.name, key=ctx.key, base=base, model=model,
                  upstream=lineage(ctx.workspace, ctx.inputs), settings=settings, results=results)
    (ctx.out_dir / "model" / CARD).write_text(text, encoding="utf-8")


def card_with_evaluations(model: Artifact, model_dir: str, artifacts: Iterable[Artifact]) -> str:
    """The model folder's card plus the headline numbers of each evaluation of that model in `artifacts`
    (an eval stage whose input is the model's artifact)."""
    path = model.path / model_dir / CARD
    card = path.read_text(encoding="utf-8") if path.is_file() else f"# jielong {model.stage} model\n"
    lines: list[str] = []
    for evaluation in artifacts:
        if evaluation.stage.startswith("eval_") and evaluation.manifest.get("inputs", {}).get(model.stage) == model.key:
            report = json.loads((evaluation.path / "report.json").read_text(encoding="utf-8"))
            lines += [*evaluation_section(report, evaluation.stage, evaluation.key), ""]
    if not lines:
        return card
    head, marker, tail = card.partition("\n## Intended use and limits")
    return "\n".join([head.rstrip(), "", "## Evaluation", "", *lines]) + marker + tail
