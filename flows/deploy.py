"""After the registry, as commands: `jielong export` and `jielong deploy-check` (wiring only)."""

from __future__ import annotations

import re
from pathlib import Path

from jielong.tasks.config import UserError, load_config


def model_folder(reference: str, cfg) -> Path:
    """A local model folder for any --model spec, GGUFs converted into the config's workspace."""
    from jielong.models.generate import resolve_model
    from jielong.tasks.core.tracking import tracking_uri

    try:
        return resolve_model(reference, tracking_uri(cfg), store=cfg.workspace_path())
    except ValueError as err:  # UserErrors too: one message either way
        raise UserError(str(err)) from None


def slug(reference: str) -> str:
    """A file name for a model spec: models:/jielong-instruct/3 -> jielong-instruct-v3."""
    if reference.startswith("models:/"):
        name, _, version = reference.removeprefix("models:/").partition("/")
        return f"{name}-v{version}"
    if reference.startswith("runs:/"):
        return "run-" + reference.removeprefix("runs:/")[:8]
    name = Path(reference.removeprefix("builtin:")).name
    return re.sub(r"[^\w.-]+", "-", name.removesuffix(".gguf")) or "model"


def run_export(reference: str, fmt: str, out: str | None, dtype: str, probes: str | None, config: str,
               overrides: list[str], log: bool = True) -> tuple[Path, dict, str | None]:
    """Export a model and log it to MLflow; returns (file, manifest, MLflow run id)."""
    from jielong.models.export import FORMATS, export_model
    from jielong.models.gguf_export import GGUF_TYPES, ExportError
    from jielong.models.parity import load_probes

    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if dtype not in GGUF_TYPES:
        raise ExportError(f"unknown type {dtype!r}; choose one of {', '.join(GGUF_TYPES)}")
    cfg = load_config(config, overrides)
    probe_set = load_probes(Path(probes) if probes else None)
    folder = model_folder(reference, cfg)
    name = f"{slug(reference)}.{dtype}.{fmt}"
    target = Path(out).expanduser() if out else cfg.workspace_path() / "exports" / name
    if target.is_dir():  # --out a folder: the default name inside it
        target = target / name
    manifest = export_model(folder, fmt, target, probe_set, dtype, source=reference)
    run_id = None
    if log:
        from jielong.tasks.lib.deploy.record import log_export

        run_id = log_export(cfg, reference, target.resolve(), manifest)
    return target.resolve(), manifest, run_id


def served_task(model_dir: Path) -> str:
    """The task `mlflow models serve` answers for a model downloaded from MLflow (its MLmodel), else chat."""
    import yaml

    from jielong.tasks.lib.deploy.endpoint import CHAT

    mlmodel = model_dir.parent / "MLmodel"
    if model_dir.name == "hf" and mlmodel.is_file():
        flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("transformers", {})
        return flavor.get("inference_task") or CHAT
    return CHAT


def run_deploy_check(url: str, reference: str, probes: str | None, config: str, overrides: list[str],
                     max_new_tokens: int = 16, rounds: int = 2, concurrency: int = 4) -> dict:
    """Send the probes to `url`, compare with the model in process, log an MLflow `deploy-check` run.
    Returns the figures with `passed`, `run_id` and the answers."""
    from jielong.models.parity import load_probes
    from jielong.tasks.lib.deploy.check import answers_table, figures, reference as in_process, send
    from jielong.tasks.lib.deploy.endpoint import Endpoint

    if rounds < 1 or concurrency < 1 or max_new_tokens < 1:
        raise UserError("--rounds, --concurrency and --max-new-tokens must be at least 1")
    cfg = load_config(config, overrides)
    probe_set = load_probes(Path(probes) if probes else None)
    folder = model_folder(reference, cfg)
    endpoint = Endpoint(url, served_task(folder))
    asked = [p for p in probe_set if endpoint.answers(p)]
    if not asked:
        raise UserError(f"{url} takes none of the probes' kinds ({endpoint.kind}); give a probe set with other kinds")
    expected = in_process(folder, asked, max_new_tokens).answers
    answers = send(endpoint, asked, max_new_tokens, rounds, concurrency)
    result = figures(answers, expected)
    result.update(passed=not result["probes_differing"] and result["errors"] == 0, api=endpoint.kind,
                  skipped=[p.id for p in probe_set if p not in asked], answers=answers_table(answers, expected))
    result["run_id"] = log_check(cfg, url, reference, result, dict(rounds=rounds, concurrency=concurrency,
                                                                    max_new_tokens=max_new_tokens))
    return result


def log_check(cfg, url: str, reference: str, result: dict, settings: dict) -> str:
    from jielong.tasks.core.tracking import Tracker

    tracker = Tracker(cfg)
    run_id = tracker.start_run("deploy-check", {"jielong.model": reference, "jielong.endpoint": url,
                                                "jielong.deploy_check": "passed" if result["passed"] else "failed"})
    tracker.log_batch(run_id, {"url": url, "model": reference, "api": result["api"], **{k: str(v) for k, v in settings.items()}},
                      {f"deploy/{name}": float(result[name]) for name in
                       ("requests", "errors", "error_rate", "latency_p50_s", "latency_p95_s", "probes_answered")}
                      | {"deploy/probes_differing": float(len(result["probes_differing"])), "deploy/passed": float(result["passed"])})
    tracker.log_table(run_id, result["answers"], "deploy_check_answers.json")
    if result["passed"]:
        tracker.end_run(run_id)
    else:
        tracker.mark_failed(run_id)
    return run_id
