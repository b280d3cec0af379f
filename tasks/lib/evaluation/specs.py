"""In-context task specs (data/eval/*.yaml, format in data/eval/README.md): loading them and naming
the files a task reads. No torch here: `jielong stages` fingerprints these files to compute keys."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from jielong.tasks.lib.evaluation import builtin_tasks
from jielong.tasks.core.resources import shipped_dir
from jielong.tasks.core.schema import Strict

SPEC_DIR = shipped_dir("eval_tasks")


# ---------------------------------------------------------------- the spec


class TaskData(Strict):
    builtin: str | None = None  # a builder in tasks/lib/evaluation/builtin_tasks.py (held-out built-in corpus)
    path: str | None = None  # relative to the spec file, or absolute; ~ expanded
    # or: one file per label, {label: file}, as the sentence-polarity data ships (rt-polarity.pos/.neg);
    # each non-empty line (or record of a structured file) is one example of that label
    label_files: dict[str, str] | None = None
    format: Literal["jsonl", "json", "tsv", "csv", "parquet"] | None = None  # default: from the suffix
    columns: list[str] | None = None  # TSV/CSV without a header row (GLUE-style "sentence<TAB>label")
    fewshot_path: str | None = None  # demonstration pool file (same format); default: set aside from `path`
    fewshot_pool: int = Field(32, ge=1, description="examples set aside as demonstrations when no fewshot_path")

    @model_validator(mode="after")
    def _one_source(self) -> "TaskData":
        if sum(x is not None for x in (self.builtin, self.path, self.label_files)) != 1:
            raise ValueError("data needs exactly one of `builtin`, `path` or `label_files`")
        if self.label_files is not None and len(self.label_files) < 2:
            raise ValueError("label_files needs a file for each of at least two labels")
        if self.builtin is not None and self.builtin not in builtin_tasks.BUILDERS:
            raise ValueError(f"unknown builtin task {self.builtin!r}; known: {sorted(builtin_tasks.BUILDERS)}")
        return self


class TaskSpec(Strict):
    name: str
    description: str = ""
    data: TaskData
    input_field: str = "text"  # the main input; cut to max_input_chars
    label_field: str = "label"  # a choice index, a choice string, or one of label_values
    template: str | None = None  # str.format over the example's fields; default "{<input_field>}"
    choices: list[str] | None = None  # fixed verbalisers, in label order
    choices_field: str | None = None  # or: a field holding each example's own list of choices
    label_values: list[str] | None = None  # raw label values in choice order, e.g. ["0", "1"]
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    max_input_chars: int | None = Field(None, ge=1)
    chance: float = Field(..., ge=0, le=1, description="accuracy of guessing: state it, it is the baseline of every plot")
    leading_eos: bool | None = None  # the prompt starts with an end-of-text token; default: evaluate.icl.leading_eos
    chance_note: str = ""

    @model_validator(mode="after")
    def _one_choice_source(self) -> "TaskSpec":
        if (self.choices is None) == (self.choices_field is None):
            raise ValueError("a task needs exactly one of `choices` (verbalisers) or `choices_field`")
        return self

    def doc_to_text(self, example: dict) -> str:
        return (self.template or "{" + self.input_field + "}").format_map(example)

    def doc_to_choice(self, example: dict) -> list[str]:
        return list(example["choices"])


def resolve_spec_path(name_or_path: str) -> Path:
    """A spec file, or a folder of lm-evaluation-harness task files (harness_tasks.py)."""
    path = Path(name_or_path).expanduser()
    if (path.suffix in (".yaml", ".yml", ".json") and path.is_file()) or path.is_dir():
        return path
    for suffix in (".yaml", ".yml", ".json"):
        candidate = SPEC_DIR / f"{name_or_path}{suffix}"
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in SPEC_DIR.glob("*.y*ml")) if SPEC_DIR.is_dir() else []
    raise FileNotFoundError(f"no task spec {name_or_path!r}: give a path or one of {known} (in {SPEC_DIR})")


def load_spec(name_or_path: str) -> tuple[TaskSpec, Path]:
    """A native spec; a mistake in it is a ValueError of one line per problem."""
    path = resolve_spec_path(name_or_path)
    raw = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    try:
        return TaskSpec.model_validate(raw), path.parent
    except ValidationError as err:
        raise ValueError(_explain(path, err)) from None


def _explain(path: Path, err: ValidationError) -> str:
    unknown = sorted({".".join(map(str, e["loc"])) for e in err.errors() if e["type"] == "extra_forbidden"})
    problems = [f"{'.'.join(map(str, e['loc'])) or 'spec'}: {e['msg']}" for e in err.errors() if e["type"] != "extra_forbidden"]
    if unknown:
        problems.insert(0, f"unknown keys {', '.join(unknown)} (a jielong spec takes {', '.join(TaskSpec.model_fields)}; "
                           "an lm-evaluation-harness task file needs `task:` and `output_type:`)")
    return f"{path}: " + "; ".join(problems)


def is_harness(name_or_path: str) -> bool:
    """Does this name or path point at lm-evaluation-harness task files?"""
    from jielong.tasks.lib.evaluation.harness_tasks import is_harness_file

    try:
        return is_harness_file(resolve_spec_path(name_or_path))
    except FileNotFoundError:
        return False


def spec_files(name_or_path: str) -> list[tuple[str, Path]]:
    """(name, path) of the spec file and the data files it names: what a task's results depend on."""
    try:
        path = resolve_spec_path(name_or_path)
    except FileNotFoundError:
        return [(name_or_path, Path("/nonexistent") / name_or_path)]  # fingerprinted as missing
    if is_harness(name_or_path):
        from jielong.tasks.lib.evaluation.harness_tasks import files_read

        return [(path.name, path), *files_read(path)] if path.is_file() else files_read(path)
    files = [(path.name, path)]
    try:
        spec, base = load_spec(name_or_path)
    except Exception:  # an invalid spec: its content is the fingerprint, evaluation reports the error
        return files
    for field_name in ("path", "fewshot_path"):
        value = getattr(spec.data, field_name)
        if value:
            files.append((field_name, _path(base, value)))
    for label, value in sorted((spec.data.label_files or {}).items()):
        files.append((f"label:{label}", _path(base, value)))
    return files


def _path(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path
