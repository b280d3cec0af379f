"""The stage contract: content-addressed, atomically completed artifacts.

A stage is a name, a code version, the config settings it reads (`reads`), the stages whose
artifacts it reads (`inputs`), the files it reads outside those artifacts (`external`), and one plain
function `run(ctx) -> StageResult` that fills `ctx.out_dir`. Data stages split their work into shard
jobs and hand them to `ctx.map(fn, jobs)`: the pipeline flow runs them as Prefect tasks on its task
runner (processes, threads or Dask); outside a flow they run in a plain loop.

What a stage sees is what its key covers, by construction (as Marin's executor hashes exactly the
versioned fields of a step's config):
- `ctx.config` is a ConfigView holding only the paths in `reads` (whole sections such as "dedup",
  single settings such as "seed" or "ingest.shard_size"); reading anything else raises.
- key = hash(name, the view without its NO_OUTPUT settings (tasks/core/schema.py), input keys, content
  fingerprints of the external files, code version).
Its output is data/<stage>/<key>/, written in a temporary directory beside it and renamed into place
once the manifest is written. A complete manifest at that path IS the cache.

When to bump a stage's `version`: whenever a code change can make the same config and inputs give
a different artifact — other documents, ids, counts, rejection reasons, token ids, weights or
metric values (a new rule, a changed default inside the code, a fixed bug that changed outputs).
Refactors that keep every output byte-for-byte (or, for models, the same numbers) need no bump.
tests/test_stage_versions.py holds digests of what the data stages write on a fixed fixture, per
version: when it fails after your change, the output changed, so bump the stage's version and record
the new digest it prints.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from jielong.tasks.core.config import RunConfig, canonical_hash
from jielong.tasks.core.schema import keyed, output_fields

MANIFEST = "manifest.json"
JIELONG_VERSION = "0.1.0"


class ConfigView:
    """The part of the run config one stage may read: the declared paths, nothing else.

    Whole sections are deep copies of their typed (pydantic) section; a path inside a section
    ("ingest.shard_size") gives a view of that section holding only the declared settings.
    """

    def __init__(self, stage: str, values: dict[str, Any], prefix: str = "", unkeyed: frozenset[str] = frozenset()):
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_values", values)
        object.__setattr__(self, "_prefix", prefix)
        object.__setattr__(self, "_unkeyed", unkeyed)  # settings read here that stay out of the key

    @classmethod
    def of(cls, cfg: RunConfig, stage: str, paths: tuple[str, ...]) -> "ConfigView":
        tree: dict[str, Any] = {}
        unkeyed: set[str] = set()
        for path in paths:
            parts = path.split(".")
            node, value = tree, cfg
            for depth, part in enumerate(parts):
                parent, value = value, getattr(value, part)
                if depth < len(parts) - 1:
                    node = node.setdefault(part, {})
            node[parts[-1]] = value.model_copy(deep=True) if hasattr(value, "model_copy") else value
            if not keyed(type(parent).model_fields[parts[-1]], value):  # a single setting is keyed as in its section
                unkeyed.add(path)
        return cls._build(stage, tree, "", frozenset(unkeyed))

    @classmethod
    def _build(cls, stage: str, tree: dict[str, Any], prefix: str, unkeyed: frozenset[str]) -> "ConfigView":
        values = {name: cls._build(stage, v, f"{prefix}{name}.", unkeyed) if isinstance(v, dict) else v for name, v in tree.items()}
        return cls(stage, values, prefix, frozenset(name for name in tree if prefix + name in unkeyed))

    def __getattr__(self, name: str) -> Any:
        values = object.__getattribute__(self, "_values")
        if name in values:
            return values[name]
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"stage {self._stage!r} does not read config {self._prefix + name!r}: add it to the "
                             "stage's `reads` (it then enters the stage's key)")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a stage's config view is read-only")

    def section(self, name: str) -> Any:
        return getattr(self, name)

    def dump(self) -> dict:
        """Everything the stage can read (for the manifest and MLflow params)."""
        return {name: v.dump() if isinstance(v, ConfigView) else _jsonable(v) for name, v in self._values.items()}

    def output_dump(self) -> dict:
        """What can change the stage's output: the view without NO_OUTPUT settings (what the key hashes)."""
        return {name: v.output_dump() if isinstance(v, ConfigView) else output_fields(v)
                for name, v in self._values.items() if name not in self._unkeyed}


def _jsonable(value: Any) -> Any:
    from pydantic_core import to_jsonable_python

    return value.model_dump(mode="json") if hasattr(value, "model_dump") else to_jsonable_python(value)


@dataclass(frozen=True)
class Stage:
    name: str
    version: str
    # config paths: sections ("dedup") or settings ("seed", "ingest.shard_size"); a function of the config
    # when what the stage reads depends on it (tokenize reads no tokenizer settings for an init_from model)
    reads: tuple[str, ...] | Callable[[RunConfig], tuple[str, ...]]
    inputs: tuple[str, ...]
    run: Callable[["StageContext"], "StageResult"]
    # fingerprint of what the stage reads outside its input artifacts (files by content, the Python
    # version of the built-in corpus); it sees the same view as `run`
    external: Callable[[ConfigView], Any] | None = None

    def paths(self, cfg: RunConfig) -> tuple[str, ...]:
        return self.reads(cfg) if callable(self.reads) else self.reads

    def view(self, cfg: RunConfig) -> ConfigView:
        return ConfigView.of(cfg, self.name, self.paths(cfg))

    def config_of(self, cfg: RunConfig) -> dict:
        return self.view(cfg).dump()

    def key(self, cfg: RunConfig, input_keys: dict[str, str]) -> str:
        view = self.view(cfg)
        return canonical_hash(
            {
                "stage": self.name,
                "config": view.output_dump(),
                "inputs": input_keys,
                "version": self.version,
                "external": self.external(view) if self.external else None,
            }
        )


@dataclass
class Artifact:
    """A completed stage output: a directory with a manifest."""

    path: Path
    manifest: dict

    @property
    def stage(self) -> str:
        return self.manifest["stage"]

    @property
    def key(self) -> str:
        return self.manifest["key"]

    def files(self, group: str) -> list[Path]:
        """Data files of one group (e.g. 'kept', 'rejected', 'train'), in manifest order."""
        return [self.path / f["path"] for f in self.manifest["files"] if f["path"].split("/")[0] == group]


def run_sequentially(fn: Callable[[Any], dict], jobs: list[Any]) -> list[dict]:
    return [fn(job) for job in jobs]


@dataclass
class StageContext:
    stage: Stage
    config: ConfigView  # only what the stage declares in `reads`
    workspace: Path  # where artifacts live (not part of any output)
    key: str
    inputs: dict[str, Artifact]
    out_dir: Path  # the temporary directory being filled
    map: Callable[[Callable[[Any], dict], list[Any]], list[dict]] = field(default=None)  # type: ignore[assignment]
    log: Callable[[list[tuple[str, float, int]]], None] = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.map is None:
            self.map = run_sequentially
        if self.log is None:
            self.log = lambda points: None

    @property
    def work_dir(self) -> Path:
        """Survives a failed attempt (checkpoints live here, so a rerun resumes); removed once published."""
        return work_dir(self.workspace, self.stage.name, self.key)

    def section(self, name: str | None = None) -> Any:
        return self.config.section(name or self.stage.sections[0])


@dataclass
class StageResult:
    documents_in: int = 0
    documents_out: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    bytes_in: int = 0
    bytes_out: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)  # stage-specific report, kept in the manifest
    extra_artifacts: list[str] = field(default_factory=list)  # files under out_dir to log to MLflow
    model_dir: str | None = None  # a Hugging Face model directory under out_dir, logged as "model"
    register_as: str | None = None  # ... and registered in the MLflow model registry under this name
    model_task: str = "llm/v1/completions"  # how `mlflow models serve` answers: completions, or llm/v1/chat
    tables: dict[str, list[dict]] = field(default_factory=dict)  # MLflow tables: artifact file -> rows
    phases: dict[str, float] = field(default_factory=dict)  # seconds of the stage's phases, in the manifest's timings

    @property
    def documents_rejected(self) -> int:
        return sum(self.rejected_by_reason.values())

    def check_reconciles(self, stage: str) -> None:
        if self.documents_in != self.documents_out + self.documents_rejected:
            raise RuntimeError(
                f"{stage}: documents do not reconcile: in={self.documents_in} "
                f"out={self.documents_out} rejected={self.documents_rejected}"
            )


def stage_dir(workspace: Path, stage: str) -> Path:
    return workspace / stage


def work_dir(workspace: Path, stage: str, key: str) -> Path:
    return stage_dir(workspace, stage) / f".work-{key}"


def load_artifact(workspace: Path, stage: str, key: str) -> Artifact | None:
    """The cached artifact for (stage, key), or None if there is no complete one."""
    path = stage_dir(workspace, stage) / key
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if manifest.get("complete") is not True or manifest.get("key") != key:
        return None
    return Artifact(path, manifest)


def new_temp_dir(workspace: Path, stage: str, key: str) -> Path:
    path = stage_dir(workspace, stage) / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    return path


def describe_files(root: Path) -> list[dict]:
    files = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            files.append({"path": path.relative_to(root).as_posix(), "bytes": path.stat().st_size})
    return files


def publish(tmp: Path, final: Path, manifest: dict) -> Artifact:
    """Write the manifest last, then rename the directory into place (atomic on one filesystem).

    If a forced rerun replaces an existing artifact, the old one is moved aside first and deleted
    after the rename, so a reader never sees a half-written directory at `final`.
    """
    manifest = {**manifest, "files": describe_files(tmp), "complete": True}
    part = tmp / (MANIFEST + ".part")
    part.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str), encoding="utf-8")
    os.replace(part, tmp / MANIFEST)
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return Artifact(final, manifest)


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock across processes, held while the block runs (released if the process dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def stage_lock(workspace: Path, stage: str, key: str):
    """Serialise work on one (stage, key) across processes, so two concurrent runs compute it once."""
    return file_lock(stage_dir(workspace, stage) / f".{key}.lock")


def remove_stale_temp_dirs(workspace: Path, stage: str, key: str) -> None:
    """Temporary directories of a crashed earlier attempt at this key (we hold the key's lock)."""
    for path in stage_dir(workspace, stage).glob(f".tmp-{key}-*"):
        shutil.rmtree(path, ignore_errors=True)


def build_manifest(ctx: StageContext, result: StageResult, seconds: float, run_ids: dict) -> dict:
    return {
        "stage": ctx.stage.name,
        "key": ctx.key,
        "code_version": ctx.stage.version,
        "jielong_version": JIELONG_VERSION,
        "config": ctx.config.dump(),
        "inputs": {name: art.key for name, art in ctx.inputs.items()},
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "counts": {
            "documents_in": result.documents_in,
            "documents_out": result.documents_out,
            "documents_rejected": result.documents_rejected,
            "rejected_by_reason": dict(sorted(result.rejected_by_reason.items())),
            "bytes_in": result.bytes_in,
            "bytes_out": result.bytes_out,
        },
        "metrics": result.metrics,
        "details": result.details,
        "timings": {"seconds": round(seconds, 3), **{f"{name}_seconds": round(s, 3) for name, s in result.phases.items()}},
        **run_ids,
    }


def compute_artifact(stage: Stage, cfg: RunConfig, key: str, inputs: dict[str, Artifact],
                     map: Callable | None = None, run_ids: dict | None = None,
                     log: Callable | None = None) -> tuple[Artifact, StageResult]:
    """Run a stage into a temporary directory and publish it: the whole contract but caching/tracking.

    The caller holds the key's lock. On any failure the temporary directory is removed, so nothing
    complete-looking is left behind.
    """
    from jielong.tasks.core.shards import write_samples

    workspace = cfg.workspace_path()
    remove_stale_temp_dirs(workspace, stage.name, key)
    tmp = new_temp_dir(workspace, stage.name, key)
    try:
        ctx = StageContext(stage, stage.view(cfg), workspace, key, inputs, tmp, map=map, log=log)
        with Timer() as timer:
            result = stage.run(ctx)
        result.check_reconciles(stage.name)
        data_groups = {p.relative_to(tmp).parts[0] for p in tmp.rglob("*.parquet")} - {"rejected"}
        kept = sorted(p for group in data_groups for p in (tmp / group).glob("*.parquet"))
        write_samples(tmp, kept, sorted((tmp / "rejected").glob("*.parquet")), result.rejected_by_reason,
                      cfg.mlflow.samples)
        result.details.setdefault("data_groups", sorted(data_groups))
        manifest = build_manifest(ctx, result, timer.seconds, run_ids or {})
        artifact = publish(tmp, stage_dir(workspace, stage.name) / key, manifest)
        shutil.rmtree(ctx.work_dir, ignore_errors=True)
        return artifact, result
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class Timer:
    """`with Timer() as t:` ... then t.seconds (wall)."""

    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self.start
