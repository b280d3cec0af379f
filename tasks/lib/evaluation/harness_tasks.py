"""lm-evaluation-harness task files as they are: a task YAML (or a folder of them, `include:` and `group:`
resolved by the harness) in `evaluate.icl.tasks`, loaded by lm-eval's own TaskManager, scored by jielong's
engine (icl.py).

The harness builds every request: its Jinja templates and filters (`| trim`), its datasets loading
(`dataset_path: csv|json|parquet|text` with `data_files`, or a datasets folder), its few-shot sampler seeded
with jielong's seed (`task.set_fewshot_seed`, as its evaluator's `fewshot_random_seed`), so the contexts
and continuations jielong scores are byte for byte those of `lm_eval --fewshot_random_seed SEED`.
Like the harness, nothing is put before a context (no end-of-text token).

Scored output types: `multiple_choice` (acc, acc_norm, acc_bytes as the harness defines them; also a
multiple-input task such as winogrande, whose doc_to_text gives the gold index and whose choices each make
their own context for one shared continuation), `loglikelihood` (acc = the target is the greedy
continuation, and its perplexity) and `loglikelihood_rolling` (whole documents scored by jielong's perplexity
engine in the harness's windows, their metrics by the task's own process_results and aggregations:
word_perplexity, byte_perplexity, bits_per_byte; k = 0 only). A task with several gold targets per example
(doc_to_target gives a list of indices) is scored as the harness scores it: a prediction is right when it is
one of them. Every metric of a task's metric_list comes from the task's own process_results and aggregations
(f1, mcc, brier_score, exact_match, acc_mutual_info with its unconditional requests, a custom function), so
a name means what the harness means; jielong adds its own (acc_bytes, macro_f1, the answer's calibration).
Gold demonstrations are the harness's own; the `random` and `none` modes (Min et al., 2022) keep the same demonstrations and
replace the answer of each by a random choice or nothing (`random` needs choices: multiple_choice only;
a multiple-input task is scored with gold demonstrations only).

lm-eval is the optional `harness` extra (`pip install 'jielong[harness]'`): a native task spec needs none
of it, and naming a harness file without it installed is a one-line error that says what to install.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from jielong.tasks.core.schema import UserError

# keys only a harness task file has (a jielong spec has none of them)
HARNESS_KEYS = ("task", "group", "include", "output_type", "doc_to_text", "doc_to_choice", "dataset_path")
SCORED_TYPES = ("multiple_choice", "loglikelihood", "loglikelihood_rolling")


class _Loader(yaml.SafeLoader):
    """Reads harness YAML without running it: `!function utils.fn` stays the string `utils.fn`."""


_Loader.add_multi_constructor("!", lambda loader, tag, node: loader.construct_scalar(node) if isinstance(node, yaml.ScalarNode) else None)


def read_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)


def is_harness_file(path: Path) -> bool:
    """A folder, or a YAML file with a key only harness task files have."""
    if path.is_dir():
        return True
    if path.suffix not in (".yaml", ".yml") or not path.is_file():
        return False
    try:
        raw = read_yaml(path)
    except yaml.YAMLError:
        return False
    return isinstance(raw, dict) and any(key in raw for key in HARNESS_KEYS)


# ---------------------------------------------------------------- what a task reads


def files_read(path: Path) -> list[tuple[str, Path]]:
    """Every file a harness task (or folder of them) can read: the YAML and Python files of its folder
    (includes, groups and `!function` helpers live there) and the local data files its YAMLs name."""
    root = path if path.is_dir() else path.parent
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml", ".py"))
    out = [(p.relative_to(root).as_posix(), p) for p in files]
    for yaml_file in files:
        if yaml_file.suffix == ".py":
            continue
        try:
            raw = read_yaml(yaml_file)
        except yaml.YAMLError:
            continue
        for data in _data_paths(raw):
            out.extend(sorted((f"data:{p}", p) for p in (data.rglob("*") if data.is_dir() else [data]) if p.is_file()))
    return out


def _data_paths(raw) -> list[Path]:
    """Local paths a harness YAML loads data from: dataset_path (a folder), data_files, data_dir."""
    if not isinstance(raw, dict):
        return []
    found = []
    kwargs = raw.get("dataset_kwargs") or {}
    values = [raw.get("dataset_path"), kwargs.get("data_dir")] if isinstance(kwargs, dict) else [raw.get("dataset_path")]
    files = kwargs.get("data_files") if isinstance(kwargs, dict) else None
    if isinstance(files, dict):
        files = list(files.values())
    for value in (files if isinstance(files, list) else [files]):
        values += value if isinstance(value, list) else [value]
    for value in values:
        if isinstance(value, str) and value and Path(value).expanduser().exists():
            found.append(Path(value).expanduser())
    return found


# ---------------------------------------------------------------- loading


@dataclass(frozen=True)
class GroupAggregate:
    """A harness group's `aggregate_metric_list`: which metrics of its tasks (all its leaf tasks, nested groups
    included) it averages, and whether each task weighs by its number of examples (the harness's default)."""

    name: str
    metrics: tuple[str, ...]
    weight_by_size: tuple[bool, ...]


@dataclass
class HarnessSpec:
    """What the report and metrics need of a harness task (the fields of a native TaskSpec it uses)."""

    name: str
    output_type: str
    source: str
    chance: float
    chance_note: str
    description: str = ""
    leading_eos: bool | None = False  # the harness puts nothing before a context
    groups: tuple[GroupAggregate, ...] = ()  # the aggregating groups this task belongs to

    def doc_to_choice(self, example: dict) -> list[str]:
        return list(example["choices"])


@dataclass
class HarnessTask:
    spec: HarnessSpec
    task: Any  # lm_eval's ConfigurableTask
    examples: list[dict]  # id, choices, label (index of the gold choice, a list of them for several; None for loglikelihood)
    pool: list = field(default_factory=list)  # the few-shot docs
    limit: int | None = None

    def supports(self, mode: str) -> bool:
        """Whether `mode` can rewrite this task's demonstrations: `random` needs choices, and a multiple-input
        task (winogrande: one context per choice, the choice inside the text) keeps the harness's own."""
        if mode == "gold":
            return True
        return not self.task.multiple_input and (mode == "none" or self.spec.output_type == "multiple_choice")

    def requests(self, mode: str, k: int, seed: int) -> list[list[tuple[str, str]]]:
        """Per example, its (context, continuation) requests in the harness's order, as the harness builds them
        for this k and few-shot seed: one context and a continuation per choice, or (a multiple-input task)
        a context per choice and one continuation. `random` and `none` change only the demonstrations' answers."""
        per_example, demos = self._requests(k, seed)
        if mode == "gold" or k == 0:
            return per_example
        if not self.supports(mode):
            raise UserError(f"harness task {self.spec.name!r}: mode {mode!r} cannot rewrite its demonstrations; use modes: [gold]")
        rng = np.random.default_rng([seed, 1])
        out = []
        for reqs, example, drawn in zip(per_example, self.examples, demos):
            query = reqs[0][0]  # one context per example here (acc_mutual_info adds unconditional ones: kept)
            context = self._relabel(query, example, drawn, mode, rng)
            out.append([(context if c == query else c, continuation) for c, continuation in reqs])
        return out

    def prompts(self, mode: str, k: int, seed: int) -> list[tuple[str, list[str]]]:
        """(context, continuations) per example, for a task with one context per example."""
        out = []
        for reqs in self.requests(mode, k, seed):
            if len({context for context, _ in reqs}) != 1:
                raise ValueError(f"harness task {self.spec.name!r} has a context per choice: use requests()")
            out.append((reqs[0][0], [continuation for _, continuation in reqs]))
        return out

    def _requests(self, k: int, seed: int):
        task = self.task
        task.set_config(key="num_fewshot", value=k)
        task.set_fewshot_seed(seed)
        drawn: list[list[dict]] = []
        if k > 0:
            sample = task.sampler.sample
            task.sampler.sample = lambda *a, **kw: drawn.append(sample(*a, **kw)) or drawn[-1]
        try:
            with quiet_harness():
                task.build_all_requests(limit=self.limit)
        except Exception as err:  # the harness's own failure (a template that breaks, a target it cannot write)
            raise UserError(f"harness task {self.spec.name!r}: lm-eval could not build its requests at k = {k}: "
                            f"{_one_line(err)}") from None
        finally:
            if k > 0:
                task.sampler.__dict__.pop("sample", None)
        by_doc: dict[int, list] = {}
        for instance in task.instances:
            by_doc.setdefault(instance.doc_id, []).append(instance)
        per_example = []
        for example in self.examples:
            instances = sorted(by_doc[example["doc_id"]], key=lambda inst: inst.idx)
            per_example.append([(inst.arguments[0], inst.arguments[1]) for inst in instances])
        return per_example, drawn or [[] for _ in self.examples]

    def rolling_texts(self) -> list[str]:
        """A loglikelihood_rolling task's documents, as the harness's requests hold them (doc_to_target)."""
        task = self.task
        task.set_config(key="num_fewshot", value=0)
        with quiet_harness():
            task.build_all_requests(limit=self.limit)
        text_of = {instance.doc_id: instance.arguments[0] for instance in task.instances}
        return [text_of[example["doc_id"]] for example in self.examples]

    def rolling_metrics(self, logliks: list[float]) -> dict[str, float]:
        """The task's own metrics of its documents' log-likelihoods: its process_results per document (a custom
        one included, as wikitext's) and its aggregations (weighted perplexities, bits per byte)."""
        return self._aggregate([[loglik] for loglik in logliks])

    def own_metrics(self, scored: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
        """The task's own metrics (its metric_list) of one setting: per example, the (log-likelihood, is greedy)
        of each of its requests in the harness's order, through its process_results and aggregations."""
        return self._aggregate([[(float(ll), bool(greedy)) for ll, greedy in zip(lls, greedies)]
                                for lls, greedies in scored])

    def _aggregate(self, results: list[list]) -> dict[str, float]:
        task = self.task
        values: dict[str, list] = {}
        with quiet_harness():
            for example, result in zip(self.examples, results):
                for name, value in task.process_results(example["doc"], result).items():
                    values.setdefault(name, []).append(value)
        aggregations = task.aggregation()
        unknown = sorted(set(values) - set(aggregations))
        if unknown:
            raise UserError(f"harness task {self.spec.name!r}: no aggregation for metric {', '.join(map(repr, unknown))} "
                            "(give it one in metric_list)")
        return {name: float(aggregations[name](found)) for name, found in values.items()}

    def _relabel(self, context: str, example: dict, demos: list[dict], mode: str, rng) -> str:
        """The harness's context with each demonstration's answer replaced (random) or left out (none)."""
        task = self.task
        prefix = task.resolve_field(example["doc"], task.config.description) or ""
        gold = "".join(self._turn(d, None) for d in demos)
        if not context.startswith(prefix + gold):
            raise UserError(f"harness task {self.spec.name!r}: its prompt is not description + demonstrations + "
                            f"query, so mode {mode!r} cannot replace the demonstrations' answers; use modes: [gold]")
        if mode == "random":
            changed = "".join(self._turn(d, int(rng.integers(len(self._choices(d))))) for d in demos)
        else:
            cfg = task.fewshot_cfg
            changed = "".join(task.doc_to_text(d, cfg.doc_to_text) + cfg.fewshot_delimiter for d in demos)
        return prefix + changed + context[len(prefix + gold):]

    def _choices(self, demo: dict) -> list[str]:
        return self.task.doc_to_choice(demo, self.task.fewshot_cfg.doc_to_choice)

    def _turn(self, demo: dict, answer: int | None) -> str:
        """One demonstration as the harness writes it (fewshot_context), with its own answer or `answer`."""
        task, cfg = self.task, self.task.fewshot_cfg
        choices = task.doc_to_choice(demo, cfg.doc_to_choice) if cfg.doc_to_choice else None
        target = task.doc_to_target(demo, cfg.doc_to_target) if answer is None else answer
        if answer is not None and choices is None:
            choices = self._choices(demo)
        turn = task.build_qa_turn(q=task.doc_to_text(demo, cfg.doc_to_text), c=choices, a=target,
                                  gen_prefix=task.resolve_field(demo, cfg.gen_prefix),
                                  tgt_delim=cfg.target_delimiter, few_delim=cfg.fewshot_delimiter)
        return "".join(message.to_text() for message in turn)


@contextlib.contextmanager
def quiet_harness():
    """The harness logs a line per metric default and per context build: left to --verbose."""
    import logging

    logger = logging.getLogger("lm_eval")
    level = logger.level
    if not logger.isEnabledFor(logging.DEBUG):
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _task_manager(root: Path):
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("lm-evaluation-harness task files need lm-eval: pip install 'jielong[harness]'") from None
    return TaskManager(include_path=str(root), include_defaults=False)


def load(path: Path, max_examples: int | None) -> list[HarnessTask]:
    """The tasks a harness YAML defines (a group's tasks for a group file), or every task of a folder."""
    root = path if path.is_dir() else path.parent
    with quiet_harness():
        manager = _task_manager(root)
        if path.is_dir():
            names = manager.all_subtasks
        else:
            raw = read_yaml(path)
            names = [raw.get("group") or raw.get("task")] if isinstance(raw, dict) else []
        names = [n for n in names if isinstance(n, str)]
        if not names:
            raise UserError(f"{path}: no lm-evaluation-harness task in it (a task file has `task: NAME`, a group "
                            "file `group: NAME` and `task: [...]`)")
        try:
            loaded = manager.load(names)
        except UserError:
            raise
        except Exception as err:  # the harness's own message, on one line
            raise UserError(f"harness task {', '.join(names)} ({path}): {_one_line(err)}") from None
    groups_of = _aggregating_groups(loaded.get("groups", {}), path)
    return [_wrap(task, path, max_examples, groups_of.get(name, ())) for name, task in sorted(loaded["tasks"].items())]


def _aggregating_groups(groups: dict, path: Path) -> dict[str, tuple[GroupAggregate, ...]]:
    """task name -> the groups with an aggregate_metric_list that hold it (as a leaf, at any depth)."""
    out: dict[str, list[GroupAggregate]] = {}
    for name, group in sorted(groups.items()):
        configs = group.aggregate_metric_list or []
        for config in configs:
            if config.aggregation != "mean":
                raise UserError(f"harness group {name!r} ({path}): aggregation {config.aggregation!r} of "
                                f"{config.metric!r} is not computed by jielong (it computes mean)")
        if not configs:
            continue
        aggregate = GroupAggregate(name, tuple(c.metric for c in configs), tuple(bool(c.weight_by_size) for c in configs))
        for task in group.get_all_tasks():
            out.setdefault(task.task_name, []).append(aggregate)
    return {task: tuple(found) for task, found in out.items()}


def _one_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _wrap(task, path: Path, max_examples: int | None, groups: tuple[GroupAggregate, ...] = ()) -> HarnessTask:
    name = task.task_name
    output_type = task.config.output_type
    if output_type not in SCORED_TYPES:
        raise UserError(f"harness task {name!r} ({path}): output_type {output_type!r} is not scored by jielong "
                        f"(it scores {', '.join(SCORED_TYPES)})")
    examples = []
    for doc_id, doc in task.doc_iterator(limit=max_examples):
        choices = list(task.doc_to_choice(doc)) if output_type == "multiple_choice" else []
        examples.append({"id": f"{name}#{doc_id}", "doc_id": doc_id, "doc": doc, "choices": choices,
                         "label": _gold(task, doc, choices) if choices else None})
    if output_type == "multiple_choice":
        chance = float(np.mean([1 / len(e["choices"]) for e in examples])) if examples else 0.0
        note = "a uniform guess among each example's choices"
    elif output_type == "loglikelihood_rolling":
        chance, note = 0.0, "the perplexity of whole documents: no guessing baseline"
    else:
        chance, note = 0.0, "acc: the target is the greedy continuation; no guessing baseline"
    pool = list(task.sampler.fewshot_docs()) if getattr(task, "sampler", None) is not None else []
    description = f"lm-evaluation-harness task `{name}` ({output_type}) from {path}."
    spec = HarnessSpec(name, output_type, str(path), chance, note, description, groups=groups)
    return HarnessTask(spec, task, examples, pool, max_examples)


def _gold(task, doc, choices: list[str]) -> int | list[int]:
    """The gold choice's index, as the harness's process_results reads it: doc_to_target, or doc_to_text for
    a multiple-input task (whose text is the index of the right context); a list of indices for a task with
    several targets."""
    gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
    if isinstance(gold, list):
        if not gold or not all(isinstance(g, (int, np.integer)) and 0 <= g < len(choices) for g in gold):
            raise UserError(f"harness task {task.task_name!r}: targets {gold!r} are not indices into {len(choices)} choices")
        return [int(g) for g in gold]
    if isinstance(gold, str):
        if gold not in choices:
            raise UserError(f"harness task {task.task_name!r}: target {gold!r} is not one of the choices {choices}")
        return choices.index(gold)
    if not isinstance(gold, (int, np.integer)) or not 0 <= gold < len(choices):
        raise UserError(f"harness task {task.task_name!r}: target {gold!r} is not an index into {len(choices)} choices")
    return int(gold)
