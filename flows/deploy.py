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
    target = Path(out) if out else cfg.workspace_path() / "exports" / f"{slug(reference)}.{dtype}.{fmt}"
    manifest = export_model(folder, fmt, target, probe_set, dtype, source=reference)
    run_id = None
    if log:
        from jielong.tasks.lib.deploy.record import log_export

        run_id = log_export(cfg, reference, target.resolve(), manifest)
    return target.resolve(), manifest, run_id
