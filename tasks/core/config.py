"""Config machinery: the run-level sections, and loading a typed config from YAML plus overrides.

A run's config is a YAML preset from configs/ (or any YAML path), then ``--set section.key=value``
overrides, validated by a pydantic schema: jielong.tasks.config.PipelineConfig, whose sections are
owned by the modules that read them (each stage module defines its own). Unknown keys and wrong types
fail at once with a message naming the key and the closest valid keys.

A stage sees only the settings it declares (`Stage.reads`, see tasks/core/contract.py) and its cache
key is computed from exactly those. Settings marked NO_OUTPUT (tasks/core/schema.py) stay out of every key.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError

from jielong.tasks.core.resources import shipped_dir
from jielong.tasks.core.schema import Strict, UserError


class ConfigError(UserError):
    """A user mistake in a config file or an override; the message says what to fix."""


class RunnerConfig(Strict):
    """How shard tasks run: `process` uses a Prefect ProcessPoolTaskRunner (`workers` processes),
    `thread` a ThreadPoolTaskRunner, `dask` prefect-dask's DaskTaskRunner (pip install 'jielong[dask]'):
    a local cluster of `workers` processes, or the cluster whose scheduler is at `dask_address`
    (flows/dask_runner.py says what its workers need)."""

    kind: Literal["process", "thread", "dask"] = "process"
    workers: int = Field(2, ge=1, le=256)
    dask_address: str | None = None  # connect to an existing Dask cluster instead of a local one


class MlflowConfig(Strict):
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///<workspace>/mlflow.db
    experiment: str = "jielong"
    samples: int = Field(20, ge=0, description="kept/rejected documents logged per stage")
    retry_seconds: float = Field(
        300, ge=0, description="how long a failing tracking call is retried (with backoff) before the run stops; "
        "stage outputs are kept, so a rerun logs them as cache hits")


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def canonical_hash(value: Any, length: int = 16) -> str:
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()[:length]


CONFIG_DIR = shipped_dir("configs")


class RunConfig(Strict):
    """What every run has besides its stage sections; the machinery (tracking, runners) reads only this.
    PipelineConfig (tasks/config.py) adds the sections of the stages."""

    name: str = "tiny"
    workspace: str = "data"
    seed: int = 1234
    runner: RunnerConfig = Field(default_factory=RunnerConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)

    def section(self, name: str) -> Any:
        return getattr(self, name)

    def workspace_path(self) -> Path:
        return Path(self.workspace).expanduser().resolve()

    def config_hash(self) -> str:
        return canonical_hash(self.model_dump(mode="json", exclude={"workspace", "runner", "mlflow"}))


Config = typing.TypeVar("Config", bound=BaseModel)


def load(root: type[Config], name_or_path: str, overrides: list[str] | None = None) -> Config:
    """Load a preset (name in configs/ or a YAML path), apply `key.path=value` overrides, validate as `root`."""
    raw = _read_yaml(name_or_path)
    for override in overrides or []:
        _apply_override(root, raw, override)
    try:
        return root.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_explain(root, err, raw)) from None


def available_presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _read_yaml(name_or_path: str) -> dict:
    path = Path(name_or_path)
    if not path.suffix and not path.is_file():  # a folder that happens to share a preset's name is not a config
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"config {name_or_path!r} not found: give a preset name ({', '.join(available_presets())}) "
            "or a path to a YAML file"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections, got {type(data).__name__}")
    data.setdefault("name", path.stem)
    return data


def _apply_override(root: type[BaseModel], raw: dict, override: str) -> None:
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {override!r} must look like section.key=value")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    parts = key.split(".")
    _check_path(root, parts)
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _check_path(root: type[BaseModel], parts: list[str]) -> None:
    """Fail early, with suggestions, on an override naming a key the schema does not have."""
    model: type[BaseModel] | None = root
    for depth, part in enumerate(parts):
        if model is None:
            return  # below a dict/list/union field: pydantic validates the value itself
        fields = dict(model.model_fields)
        fields.update(dict.fromkeys(getattr(model, "SHORTHANDS", ())))
        if part not in fields:
            where = ".".join(parts[:depth]) or "the top level"
            raise ConfigError(_unknown_key_message(".".join(parts[: depth + 1]), part, list(fields), where))
        info = fields[part]
        annotation = getattr(info, "annotation", None)
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _unknown_key_message(full_key: str, part: str, valid: list[str], where: str) -> str:
    close = difflib.get_close_matches(part, valid, n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return f"unknown config key {full_key!r}.{hint} Valid keys in {where}: {', '.join(sorted(valid))}"


def _explain(root: type[BaseModel], err: ValidationError, raw: dict) -> str:
    lines = []
    for problem in err.errors():
        loc = [str(p) for p in problem["loc"]]
        key = ".".join(loc)
        if problem["type"] == "extra_forbidden":
            lines.append(_unknown_key_message(key, loc[-1], _valid_keys_at(root, loc[:-1]), ".".join(loc[:-1]) or "the top level"))
        else:
            got = problem.get("input")
            shown = f" (got {got!r})" if not isinstance(got, (dict, list)) else ""
            lines.append(f"{key}: {problem['msg']}{shown}")
    return "invalid config:\n  " + "\n  ".join(lines)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold: X, list[X], Annotated[Union[X, Y], ...], X | None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _valid_keys_at(root: type[BaseModel], loc: list[str]) -> list[str]:
    models: list[type[BaseModel]] = [root]
    for part in loc:
        if part.isdigit():
            continue  # an index into a list: same models
        tagged = [m for m in models if "kind" in m.model_fields and m.model_fields["kind"].default == part]
        if tagged:  # pydantic puts the discriminator value of a union member in the location
            models = tagged
            continue
        infos = [m.model_fields[part] for m in models if part in m.model_fields]
        models = [m for info in infos for m in _models_in(info.annotation)]
        if not models:
            return []
    return sorted({key for m in models for key in m.model_fields})
