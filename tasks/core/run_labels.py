"""What a run says about itself in MLflow: its name, its kind, whether it is a complete pipeline run, the
error that stopped it, and the experiment tag that makes the MLflow UI open on the runs table.

Rules (the README repeats them):
- Kind (`jielong.kind`): `pipeline` (jielong run), `eval` (jielong eval), `study` (a study's parent run),
  `study_variant` (one variant of a study, nested under it), `compare` (jielong compare).
- Complete (`jielong.complete` = true): the run ended without error holding an artifact for every stage of
  its flow, each computed, a cache hit, or the cached upstream a `--from` rerun starts from. A full rerun
  whose stages were all cache hits is complete (it stands for the whole pipeline of its config); a run of
  some stages (`--only`) is partial (`false`), however it ended, as is a failed run.
"""

from __future__ import annotations

KIND_TAG = "jielong.kind"
COMPLETE_TAG = "jielong.complete"
ERROR_TAG = "jielong.error"
OVERRIDES_TAG = "jielong.overrides"
NOTE_TAG = "mlflow.note.content"  # the run's Description in the MLflow UI
KINDS = ("pipeline", "eval", "study", "study_variant", "compare")

# MLflow 3's UI reads this experiment tag (mlflow/server/js: `"mlflow.experimentKind"===e.key`); with
# "custom_model_development" ("Machine learning") it opens the experiment on its runs table instead of the
# GenAI overview of traces
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"

# overrides that say where a run writes or how it is scheduled, not what it computes: kept out of its name
WHERE_SETTINGS = ("workspace", "mlflow.", "runner.")
NAME_OVERRIDES_CHARS = 60
ERROR_CHARS = 4000


def pipeline_run_name(config: str, overrides: list[str], stages: list[str], all_stages: list[str]) -> str:
    """`tiny · dedup.threshold=0.7 · only dedup`: the config, the overrides that change results (cut short,
    with how many more), and the stages asked for. The full lists are the run's params and tags."""
    parts = [config]
    what = [o.strip() for o in overrides if not o.split("=", 1)[0].strip().startswith(WHERE_SETTINGS)]
    if what:
        parts.append(_shorten(what))
    parts.append(stages_label(stages, all_stages))
    return " · ".join(parts)


def command_line(config: str, overrides: list[str], only: list[str] | None, from_stage: str | None,
                 force: list[str] | None) -> str:
    """The `jielong run` command that reruns this run (its description in the UI)."""
    import shlex

    words = ["jielong", "run", "--config", config, *(w for o in overrides for w in ("--set", o))]
    words += [*(["--only", ",".join(only)] if only else []), *(["--from", from_stage] if from_stage else []),
              *(["--force", ",".join(force)] if force else [])]
    return " ".join(shlex.quote(w) for w in words)


def stages_label(stages: list[str], all_stages: list[str]) -> str:
    if stages == all_stages:
        return "all stages"
    if stages and stages == all_stages[all_stages.index(stages[0]):]:
        return f"from {stages[0]}"
    return "only " + ",".join(stages)


def _shorten(overrides: list[str]) -> str:
    shown: list[str] = []
    for override in overrides:
        if shown and len(" ".join([*shown, override])) > NAME_OVERRIDES_CHARS:
            break
        shown.append(override)
    left = len(overrides) - len(shown)
    return " ".join(shown) + (f" (+{left} more)" if left else "")


def error_text(err: BaseException) -> str:
    """One line a person can read in the runs table: the error's type and message."""
    message = str(err).strip()
    text = f"{type(err).__name__}: {message}" if message else type(err).__name__
    return text[:ERROR_CHARS]


def failure_tags(error: str) -> dict[str, str]:
    """The error on a failed run, as a tag (searchable, a column) and as its description (the run page)."""
    return {ERROR_TAG: error, NOTE_TAG: f"Failed: {error}", COMPLETE_TAG: "false"}
