"""A stage's key is exactly what it reads: every setting of the schema and every file a stage reads
outside its inputs, checked against the data flow written out below (not against the stages'
own declarations, so a stage that starts reading something undeclared, or declares too much, fails).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

from jielong.flows.stages import STAGES, stage_keys
from jielong.tasks.config import PipelineConfig, load_config

# Which stages read each part of the config (the longest matching prefix wins). Settings that
# cannot change any output are read by no stage.
READERS: dict[str, set[str]] = {
    "name": set(), "workspace": set(), "runner": set(), "mlflow": set(),
    "seed": {"eval_pretrain", "eval_instruct"},  # in-context demonstration draws, kNN-LM datastore shuffle
    "ingest": {"ingest"},
    "ingest.shard_size": {"ingest", "clean", "dedup"},  # every data stage writes shards of this size
    "ingest.shard_bytes": {"ingest", "clean", "dedup"},
    "clean": {"clean"},
    "dedup": {"dedup"},
    "split": {"dedup"},
    "tokenizer": {"tokenize"},
    "model": {"tokenize", "pretrain"},
    # the shape replaces the preset's dimensions: the model only, not the tokenizer's context
    **{f"model.{name}": {"pretrain"} for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size")},
    "pretrain": {"pretrain"},
    "instruct": {"instruct"},
    "evaluate": {"eval_pretrain", "eval_instruct"},
    # logging and checkpoint cadence, registry names: no output changes
    **{f"{stage}.{name}": set() for stage in ("pretrain", "instruct")
       for name in ("log_every", "checkpoint_every", "register_as", "rdzv_endpoint")},
}
DOWNSTREAM = {
    "ingest": {"clean"}, "clean": {"dedup"}, "dedup": {"tokenize", "instruct", "eval_pretrain", "eval_instruct"},
    "tokenize": {"pretrain"}, "pretrain": {"instruct", "eval_pretrain"}, "instruct": {"eval_instruct"},
    "eval_pretrain": set(), "eval_instruct": set(),
}
# changing a source's kind replaces the source (other fields, other validation): not a setting
NOT_SETTINGS = {"ingest.sources.0.kind", "instruct.sources.0.kind"}
STRING_ALTERNATIVES = ["thread", "reject", "NFKC", "cpu", "never", "line", "final", "small", "fp32", "random", "ddp",
                       "gloo", "off", "replies"]
# settings valid only together with others: changed from a base config that already holds those
CONTEXT = {
    **{f"{stage}.{name}": {f"{stage}.distributed": "ddp"} for stage in ("pretrain", "instruct")
       for name in ("nproc", "backend")},
    **{f"{stage}.{name}": {f"{stage}.distributed": "ddp", f"{stage}.nnodes": 2,
                           f"{stage}.rdzv_endpoint": "head:29400"} for stage in ("pretrain", "instruct")
       for name in ("nnodes", "rdzv_endpoint")},
}


def affected(readers: set[str]) -> set[str]:
    out, todo = set(), list(readers)
    while todo:
        stage = todo.pop()
        if stage not in out:
            out.add(stage)
            todo += DOWNSTREAM[stage]
    return out


def readers_of(path: str) -> set[str]:
    parts = path.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in READERS:
            return READERS[prefix]
    raise AssertionError(f"{path}: add it to READERS")


def leaves(value, path: str = ""):
    """(dotted path, value) of every setting; a list of scalars is one setting, dicts and lists of
    objects are walked."""
    if isinstance(value, dict) and value:
        for key, child in value.items():
            yield from leaves(child, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for i, child in enumerate(value):
            yield from leaves(child, f"{path}.{i}")
    else:
        yield path, value


def candidates(value, path: str, tmp_path: Path) -> list:
    if path == "evaluate.perplexity.extra":
        return [[{"name": "more", "path": str(tmp_path)}]]
    if path.endswith("rdzv_endpoint"):
        return ["other:29500"]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value * 2, value - 1]
    if isinstance(value, float):
        return [value * 0.9, value + 0.01, 0.5]
    if isinstance(value, str):
        return [value + "x", *[s for s in STRING_ALTERNATIVES if s != value]]
    if value is None:
        return [64, 0.5, "x", {"2": 0.2}, {}]
    if isinstance(value, list):
        return [value[:-1], [*value, *value[:1]]] if value else [["x"], [str(tmp_path)]]
    raise AssertionError(f"{path}: no change for {value!r}")


def changed_config(raw: dict, path: str, tmp_path: Path) -> PipelineConfig | None:
    value = raw
    for part in path.split("."):
        value = value[int(part)] if isinstance(value, list) else value[part]
    for new in candidates(value, path, tmp_path):
        edited = copy.deepcopy(raw)
        node = edited
        parts = path.split(".")
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[parts[-1]] = new
        try:
            return PipelineConfig.model_validate(edited)
        except ValueError:
            continue
    return None


def test_every_setting_changes_exactly_the_keys_of_the_stages_that_read_it(tmp_path: Path):
    base = load_config("tiny", [f"workspace={tmp_path / 'ws'}"])
    raw = base.model_dump(mode="json")
    base_keys = stage_keys(base)
    assert set(base_keys) == set(DOWNSTREAM)
    checked, wrong = 0, []
    for path, _ in leaves(raw):
        if path in NOT_SETTINGS:
            continue
        before, source = base_keys, raw
        if path in CONTEXT:
            context = load_config("tiny", [f"workspace={tmp_path / 'ws'}", *(f"{k}={v}" for k, v in CONTEXT[path].items())])
            before, source = stage_keys(context), context.model_dump(mode="json")
        cfg = changed_config(source, path, tmp_path)
        assert cfg is not None, f"{path}: no valid change found; add a candidate"
        after = stage_keys(cfg)
        changed = {name for name in before if before[name] != after[name]}
        expected = affected(readers_of(path))
        if changed != expected:
            wrong.append(f"{path}: changed {sorted(changed)}, expected {sorted(expected)}")
        checked += 1
    assert not wrong, "\n".join(wrong)
    assert checked > 150  # the whole schema, not a sample


SCORING = {f"evaluate.perplexity.{name}" for name in ("window", "stride", "batch_tokens", "max_documents")}
BINS = {"evaluate.calibration.equal_mass_bins", "evaluate.calibration.equal_width_bins"}


@pytest.mark.parametrize("off, part, still_keyed", [
    (["knnlm"], "evaluate.knnlm", set()),
    (["icl"], "evaluate.icl", set()),
    (["perplexity"], "evaluate.perplexity", SCORING),  # the shared test pass still feeds calibration and kNN-LM
    (["calibration"], "evaluate.calibration", BINS),  # the in-context answers are still binned
    (["calibration", "icl"], "evaluate.calibration", set()),
    (["icl", "knnlm"], "seed", set()),  # nothing left that draws
], ids=lambda v: ",".join(v) if isinstance(v, list) else None)
def test_a_disabled_evaluation_s_settings_stay_out_of_the_key(tmp_path: Path, off: list[str], part: str,
                                                              still_keyed: set[str]):
    base = load_config("tiny", [f"workspace={tmp_path / 'ws'}", *(f"evaluate.{name}.enabled=false" for name in off)])
    raw = base.model_dump(mode="json")
    before = stage_keys(base)
    settings = [path for path, _ in leaves(raw) if (path == part or path.startswith(part + ".")) and
                not path.endswith(".enabled")]
    assert settings
    for path in settings:
        after = stage_keys(changed_config(raw, path, tmp_path))
        changed = {name for name in before if before[name] != after[name]}
        assert changed == ({"eval_pretrain", "eval_instruct"} if path in still_keyed else set()), path


def test_a_stage_cannot_read_what_it_does_not_declare(tmp_path: Path):
    cfg = load_config("tiny", [f"workspace={tmp_path}"])
    clean = next(s for s in STAGES if s.name == "clean")
    view = clean.view(cfg)
    assert view.ingest.shard_size == cfg.ingest.shard_size
    with pytest.raises(AttributeError, match="does not read config 'seed'"):
        view.seed
    with pytest.raises(AttributeError, match="does not read config 'ingest.sources'"):
        view.ingest.sources
    with pytest.raises(AttributeError, match="read-only"):
        view.clean = None
    view.clean.c4.enabled = not cfg.clean.c4.enabled  # a copy: the run's config is untouched
    assert cfg.clean.c4.enabled != view.clean.c4.enabled
    for stage in STAGES:
        assert set(stage.view(cfg).dump()) == {path.split(".")[0] for path in stage.paths(cfg)}


def test_an_init_from_model_s_keys_ignore_what_it_replaces(tmp_path: Path):
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    base = [f"workspace={tmp_path / 'ws'}", f"model.init_from={checkpoint}"]
    before = stage_keys(load_config("tiny", base))
    for setting in ("tokenizer.vocab_size=8192", "tokenizer.min_frequency=3"):  # its own tokenizer is used
        assert stage_keys(load_config("tiny", [*base, setting])) == before, setting
    # its own architecture replaces the preset's, and with a context length set the preset is not read
    preset = stage_keys(load_config("tiny", [*base, "model.context_length=128"]))
    assert stage_keys(load_config("tiny", [*base, "model.context_length=128", "model.preset=small"])) == preset


def _external_files(tmp_path: Path) -> tuple[list[str], dict[str, Path]]:
    """A config whose stages read files outside their inputs: an ingest folder, an instruct source,
    an in-context task spec with its data files, an extra perplexity set."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("Some prose for the corpus.\n")
    alpaca = tmp_path / "pairs.jsonl"
    alpaca.write_text('{"instruction": "Say hi", "output": "hi"}\n')
    data = tmp_path / "task"
    data.mkdir()
    (data / "dev.tsv").write_text("sentence\tlabel\ngood film\t1\n")
    (data / "train.tsv").write_text("sentence\tlabel\nbad film\t0\n")
    spec = data / "polarity.yaml"
    spec.write_text(yaml.safe_dump({"name": "polarity", "data": {"path": "dev.tsv", "fewshot_path": "train.tsv"},
                                    "input_field": "sentence", "choices": ["negative", "positive"], "chance": 0.5}))
    extra = tmp_path / "extra.txt"
    extra.write_text("Held-out text.\n")
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    (checkpoint / "model.safetensors").write_bytes(b"weights")
    overrides = [
        f"workspace={tmp_path / 'ws'}",
        f"ingest.sources=[{{kind: files, path: '{corpus}'}}]",
        f"instruct.sources=[{{kind: alpaca, path: '{alpaca}'}}]",
        f"evaluate.icl.tasks=['{spec}', docstring_kind]",
        f"evaluate.perplexity.extra=[{{name: extra, path: '{extra}'}}]",
        f"dedup.decontaminate.extra_eval_paths=['{extra}']",
        f"model.init_from={checkpoint}",
    ]
    files = {"corpus": corpus / "a.txt", "instruct": alpaca, "spec": spec, "task_data": data / "dev.tsv",
             "fewshot": data / "train.tsv", "extra": extra, "init_from": checkpoint / "model.safetensors"}
    return overrides, files


@pytest.mark.parametrize("name, readers", [
    ("spec", {"eval_pretrain", "eval_instruct"}),
    ("task_data", {"eval_pretrain", "eval_instruct"}),
    ("fewshot", {"eval_pretrain", "eval_instruct"}),
    ("instruct", {"instruct"}),
    ("extra", {"dedup", "eval_pretrain", "eval_instruct"}),  # decontaminated against and scored on
    ("corpus", {"ingest"}),
    ("init_from", {"tokenize", "pretrain"}),  # its tokenizer and its weights
])
def test_editing_a_file_a_stage_reads_changes_exactly_its_keys(tmp_path: Path, name: str, readers: set[str]):
    overrides, files = _external_files(tmp_path)
    before = stage_keys(load_config("tiny", overrides))
    path = files[name]
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched, same content
    assert stage_keys(load_config("tiny", overrides)) == before
    path.write_text(path.read_text() + ("x\t1\n" if path.suffix == ".tsv" else "\n#edited\n"))
    after = stage_keys(load_config("tiny", overrides))
    assert {s for s in before if before[s] != after[s]} == affected(readers)


def test_a_builtin_task_spec_is_fingerprinted_by_content(tmp_path: Path, monkeypatch):
    from jielong.tasks.lib.evaluation import specs

    spec_dir = tmp_path / "specs"
    spec_dir.mkdir()
    for spec in specs.SPEC_DIR.glob("*.yaml"):
        (spec_dir / spec.name).write_text(spec.read_text())
    monkeypatch.setattr(specs, "SPEC_DIR", spec_dir)
    cfg = load_config("tiny", [f"workspace={tmp_path / 'ws'}"])
    before = stage_keys(cfg)
    (spec_dir / "docstring_kind.yaml").write_text((spec_dir / "docstring_kind.yaml").read_text().replace(
        "This docstring documents a", "It documents a"))
    after = stage_keys(cfg)
    assert {s for s in before if before[s] != after[s]} == {"eval_pretrain", "eval_instruct"}
