"""When to bump a stage's version: this test records a digest of what each stage writes for a fixed
input, per stage version. A change that alters a stage's output makes it fail; then bump VERSION in the
stage's module (so cached artifacts of the old code are not served as the new code's) and record the
digest the failure prints. A refactor that keeps the output passes unchanged.

The data stages (ingest, clean, dedup) run on a few hand-written files with hostile records; the model
stages (tokenize, pretrain, instruct, eval_pretrain, eval_instruct) on a generated corpus of 120
documents with built-in-corpus ids, so that instruct's built-in pairs and the built-in in-context tasks
have examples, yet nothing depends on the Python installation's own documentation (which changes with
its version); a fifth of them are canaries (copied 0, 1 or 4 times), whose memorisation is evaluated.
The model is tiny (2 layers of 32, context 128), trained for 6 + 4 steps, in fp32 on the CPU.

A model stage's digest is recorded under its own version and those of the stages upstream of it: an
upstream stage's new version changes what every stage after it is given, and so their digests, without
any of them needing a new version of its own.

What is digested, and how exactly:
  - exact: token ids (tokens/*.bin byte for byte), the tokenizer's vocabulary, merges and chat template,
    counts, ids, shapes and dtypes of the weights, step numbers, the model's config, generated text,
    and every string, integer and boolean of a manifest (counts, metrics, details) or a report;
  - rounded to 4 significant digits: every float: losses, learning rates and gradient norms of the
    training curves, metrics (perplexity, ECE, accuracies, kNN-LM), and each weight tensor summed up as
    its root mean square (neither the weights themselves nor their mean, which sits near 0, where last
    bits decide the leading digits);
  - left out: what is not a function of the input (times, tokens/s, MFU, the temporary paths), and files
    rendered from the digested numbers (report.md, the model card, plots).
Why rounded: float results differ in their last bits between CPU kinds, thread counts and BLAS kernels
(another order of the same sums), and training carries the difference along, so an exact digest of the
weights would fail on a machine that runs the same code. At 4 significant digits (a relative step of
1e-4 to 1e-3) such differences (measured below: none in training, 1e-8 relative in the evaluations)
flip a digit only when a value lies that close to a rounding boundary, while a change to what the code
computes moves digested values by far more: measured, a learning-rate schedule decaying over one step
more moves the final losses and 16 of the 20 weight tensors' RMS in the third significant digit; ECE
with one equal-mass bin fewer moves the instruct model's ece_10_bin from 0.05075 to 0.05087.
A choice among near-equal values is not continuous, and rounding cannot hide it: which neighbours make
the kNN-LM's k-th place moved its perplexity by 0.1% between AVX-512 and AVX2 kernels. So the kNN-LM
here keeps k above the datastore's size (600 tokens): every entry is a neighbour, and the kNN-LM's
numbers are continuous functions of the model's states.
Checked: the same digests with 1 and 2 threads, with torch's, MKL's and oneDNN's kernels restricted to
AVX2, and to SSE4 (ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA; AVX-512 here).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import xxhash

from conftest import FAST_TRAINING, run_chain
from jielong.flows.stages import STAGES, upstream_of
from jielong.tasks import clean, dedup, ingest
from jielong.tasks.config import load_config
from jielong.tasks.core.contract import compute_artifact

RECORDED = {
    ("ingest", "3"): "218b9d7cb3475d3939f4dc79928ebba9",  # 3 changed paragraph-mode text only, which this fixture has not
    ("clean", "1"): "3a86d263cf8fd1912e4935004bad41bb",
    ("dedup", "3"): "265189fb115290817d9a15b9e6ab4224",
}
# (stage, its version, the versions of the stages upstream of it): digest
RECORDED_MODELS = {
    ("tokenize", "2", "ingest 3, clean 1, dedup 3"): "5d77025488088164d1260407a810570f",
    ("pretrain", "5", "ingest 3, clean 1, dedup 3, tokenize 2"): "ce38110f5ebb96b813738c3b524bb899",
    ("instruct", "5", "ingest 3, clean 1, dedup 3, tokenize 2, pretrain 5"): "4c723b6e3d4fe1371fef28aa8bb54940",
    ("eval_pretrain", "4", "ingest 3, clean 1, dedup 3, tokenize 2, pretrain 5"): "d27a1d594f0b5f7692076fd468badcac",
    ("eval_instruct", "4", "ingest 3, clean 1, dedup 3, tokenize 2, pretrain 5, instruct 5"): "eac569d78d9c80f25e011e52ea119232",
    # instruct 6: per-source accounting in the manifest and sources.json, self-instruct records
    ("instruct", "6", "ingest 3, clean 1, dedup 3, tokenize 2, pretrain 5"): "de876ff359c5d568b8705c65e7bbebb1",
    # eval 5: acc_norm by characters and acc_bytes by bytes; items.json and items_tokens.npz (the per-item
    # values a study resamples); the kNN-LM sweep's lambda per size and its per-document nll
    ("eval_pretrain", "5", "ingest 3, clean 1, dedup 3, tokenize 2, pretrain 5"): "9ac71d10e07864273706e5492f0278c1",
    ("eval_instruct", "5", "ingest 3, clean 1, dedup 3, tokenize 2, pretrain 5, instruct 6"): "ad8724eb3660d6926f914d7e7de1cddb",
    # instruct 7 adds items.json (the held-out measures per pair); the model, and so eval_instruct, is unchanged
    ("instruct", "7", "ingest 3, clean 1, dedup 3, tokenize 2, pretrain 5"): "cf3aa648bce9f4fc154b6644976081d0",
    ("eval_instruct", "5", "ingest 3, clean 1, dedup 3, tokenize 2, pretrain 5, instruct 7"): "ad8724eb3660d6926f914d7e7de1cddb",
    # evaluate 6 changes harness tasks only (their own metric_list, an empty context's prefix token): none here
    ("eval_pretrain", "6", "ingest 3, clean 1, dedup 3, tokenize 2, pretrain 5"): "9ac71d10e07864273706e5492f0278c1",
    ("eval_instruct", "6", "ingest 3, clean 1, dedup 3, tokenize 2, pretrain 5, instruct 7"): "ad8724eb3660d6926f914d7e7de1cddb",
    # evaluate 7 honours sliding-window layers, which this fixture's Llama has not
    ("eval_pretrain", "7", "ingest 3, clean 1, dedup 3, tokenize 2, pretrain 5"): "9ac71d10e07864273706e5492f0278c1",
    ("eval_instruct", "7", "ingest 3, clean 1, dedup 3, tokenize 2, pretrain 5, instruct 7"): "ad8724eb3660d6926f914d7e7de1cddb",
}
PROSE = [
    "The parser reads one token at a time and keeps a stack of open constructs. When a closing token "
    "arrives, it pops the stack and checks that the construct matches; a mismatch is reported with the "
    "line where the construct was opened.",
    "A cache is only as good as its key. If two inputs that differ produce the same key, the cache serves "
    "a stale answer; if equal inputs produce different keys, it recomputes work that was already done.",
    "Each shard is written to a temporary file and renamed into place when complete, so a reader never "
    "sees half of a shard, and a crash leaves nothing that looks finished.",
]


def write_corpus(folder: Path) -> Path:
    folder.mkdir()
    (folder / "a.txt").write_text("\n\n".join(PROSE) + "\n")
    (folder / "copy.txt").write_text(PROSE[0] + "\n")  # an exact duplicate paragraph
    near = PROSE[1] + " Keys must be exact."  # a near duplicate (Jaccard about 0.9)
    records = [{"text": near}, {"text": "too short"}, {"title": "no text"}, "not an object"]
    (folder / "records.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n{broken\n")
    (folder / "page.html").write_text(f"<html><body><p>{PROSE[2]}</p><script>var x = 1;</script></body></html>")
    return folder


def output_digest(artifact) -> str:
    """Rows of every data group and the rejections (id, text, source, reason, related id), in file order."""
    digest = xxhash.xxh3_128()
    for entry in artifact.manifest["files"]:
        if entry["path"].endswith(".parquet") and not entry["path"].startswith("samples/"):
            table = pq.read_table(artifact.path / entry["path"])
            columns = [c for c in ("id", "text", "source", "reason", "related_id") if c in table.column_names]
            digest.update(entry["path"].encode())
            digest.update(json.dumps(table.select(columns).to_pylist(), sort_keys=True).encode())
    digest.update(json.dumps(artifact.manifest["counts"], sort_keys=True).encode())
    return digest.hexdigest()


def test_each_data_stage_writes_what_its_version_recorded(tmp_path: Path):
    corpus = write_corpus(tmp_path / "corpus")
    cfg = load_config("tiny", [f"workspace={tmp_path / 'ws'}", f"ingest.sources=[{{kind: files, path: '{corpus}', text_unit: paragraph}}]",
                               "split.validation=0.3", "split.test=0.3"])
    artifacts = run_chain(cfg, "dedup")
    found = {(module.STAGE.name, module.STAGE.version): output_digest(artifacts[module.STAGE.name])
             for module in (ingest, clean, dedup)}
    wrong = [f"{stage} version {version}: output digest {digest}, recorded {RECORDED.get((stage, version))}"
             for (stage, version), digest in found.items() if RECORDED.get((stage, version)) != digest]
    assert not wrong, ("a stage's output changed: bump its VERSION and record the new digest in RECORDED\n  "
                       + "\n  ".join(wrong))


# ---------------------------------------------------------------- the model stages

NOUNS = ("parser record stream field schema row table value buffer cache key index shard worker queue token socket "
         "thread lock file path module class function method argument result error message list map set string "
         "number date zone order header footer line block page").split()
VERBS = ("read write check parse split join merge sort store load send receive open close return raise wrap copy "
         "move keep drop count hash encode decode format match replace").split()
ADJECTIVES = ("empty full small large stale fresh sorted hidden public private default optional missing broken valid "
              "invalid local remote shared single").split()
ADVERBS = "quickly safely lazily eagerly twice once again only always rarely".split()
TEMPLATES = [
    "The {a} {n} {v}s the {n2} before the {n3}.",
    "Each {n} {v}s one {n2} at a time.",
    "If the {n} is {a}, the {n2} {v}s it {d}.",
    "A {a} {n} never {v}s a {a2} {n2}.",
    "Return the {n} that {v}s the {a} {n2}.",
    "When a {n} arrives, the {n2} {v}s its {n3} {d}.",
    "This {n} {v}s {a} {n2}s and {v2}s the rest.",
]


def generated_documents(count: int = 120, seed: int = 5) -> list[dict]:
    """Documents of 4-11 sentences drawn from TEMPLATES, with the ids of the built-in corpus (modules,
    classes, functions, reference topics). Only random.random() draws: its sequence for a seed is the
    same in every Python version."""
    rng = random.Random(seed)

    def pick(words):
        return words[int(rng.random() * len(words))]

    def sentence() -> str:
        return pick(TEMPLATES).format(n=pick(NOUNS), n2=pick(NOUNS), n3=pick(NOUNS), v=pick(VERBS), v2=pick(VERBS),
                                      a=pick(ADJECTIVES), a2=pick(ADJECTIVES), d=pick(ADVERBS))

    documents = []
    for i in range(count):
        module = f"mod{i // 4}"  # ids are unique
        doc_id = (f"stdlib:{module}", f"stdlib:{module}:Thing{i}", f"stdlib:{module}:do_thing{i}", f"pydoc:topic{i}")[i % 4]
        documents.append({"id": doc_id, "text": " ".join(sentence() for _ in range(4 + int(rng.random() * 8)))})
    return documents


def rounded(value, drop: frozenset = frozenset()):
    """Floats to 4 significant digits (below 1e-9 in size: 0), everything else exact; keys in `drop` and
    the volatile ones (times, throughput, MFU) left out."""
    if isinstance(value, float):
        return 0.0 if abs(value) < 1e-9 else float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: rounded(v, drop) for k, v in sorted(value.items()) if k not in drop and not volatile(k)}
    if isinstance(value, (list, tuple)):
        return [rounded(v, drop) for v in value]
    return value


def volatile(name: str) -> bool:
    name = str(name).rsplit("/", 1)[-1]
    return name.endswith("seconds") or "tokens_per_s" in name or name in ("mfu", "created_at", "timings", "model_dir")


def weights_summary(path: Path) -> list:
    """Each tensor's name, dtype, shape and root mean square (4 significant digits)."""
    from safetensors.torch import load_file

    return [(name, str(tensor.dtype), list(tensor.shape), rounded(tensor.double().pow(2).mean().sqrt().item()))
            for name, tensor in sorted(load_file(str(path)).items())]


def tokenizer_summary(path: Path) -> dict:
    """The vocabulary, merges and special tokens of a tokenizer.json (not its other fields, whose layout
    belongs to the tokenizers library)."""
    data = json.loads(path.read_text())
    return {"vocab": data["model"]["vocab"], "merges": data["model"].get("merges"),
            "added": [(t["id"], t["content"], t["special"]) for t in data["added_tokens"]]}


def model_stage_digest(artifact, points: list) -> str:
    """The manifest's counts, metrics and details, the files (token streams, tokenizer, model config and
    weights, reports, generations) and the metric points logged while the stage ran."""
    digest = xxhash.xxh3_128()
    manifest = artifact.manifest
    parts = {"counts": manifest["counts"], "metrics": manifest["metrics"], "details": manifest["details"],
             "points": [(name, value, step) for name, value, step in points if not volatile(name)]}
    for entry in sorted(manifest["files"], key=lambda e: e["path"]):
        name, path = entry["path"], artifact.path / entry["path"]
        if name.endswith(".bin") or name.endswith(".jinja"):
            parts[name] = xxhash.xxh3_128_hexdigest(path.read_bytes())
        elif name.endswith("tokenizer.json"):
            parts[name] = tokenizer_summary(path)
        elif name.endswith(".safetensors"):
            parts[name] = weights_summary(path)
        elif name.endswith(".npz"):  # the evaluation's per-token values (items_tokens.npz)
            with np.load(path, allow_pickle=False) as arrays:
                parts[name] = {column: arrays[column].tolist() for column in sorted(arrays.files)}
        elif name.endswith(".json"):  # the model's and generation config, tokenizer_config, report.json, generations
            parts[name] = json.loads(path.read_text())
    text = json.dumps(rounded(parts, drop=frozenset({"transformers_version"})), sort_keys=True)
    digest.update(text.replace(str(artifact.path.parent.parent.parent), "<tmp>").encode())
    return digest.hexdigest()


def model_chain(tmp_path: Path) -> dict:
    """Every stage on the generated corpus, in this process; {stage: (artifact, metric points)}."""
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in generated_documents()))
    cfg = load_config("tiny", [
        f"workspace={tmp_path / 'ws'}", f"ingest.sources=[{{kind: files, path: '{tmp_path / 'corpus.jsonl'}', id_field: id}}]",
        "split.validation=0.2", "split.test=0.2", *FAST_TRAINING, "tokenizer.vocab_size=400", "model.context_length=128",
        "model.hidden_size=32", "model.num_heads=2", "model.num_layers=2", "model.intermediate_size=64",
        "pretrain.device=cpu", "pretrain.precision=fp32", "instruct.device=cpu", "instruct.precision=fp32",
        "evaluate.device=cpu", "evaluate.knnlm.max_train_tokens=600", "evaluate.knnlm.k=1024", "instruct.choice_examples=8",
        "ingest.canaries={repeats: [0, 1, 4], fraction: 0.2, min_chars: 300}", "evaluate.memorization.enabled=true",
        "evaluate.memorization.prefix_tokens=16", "evaluate.memorization.continuation_tokens=16",
    ])
    done: dict = {}
    for stage in STAGES:
        points: list = []
        inputs = {name: done[name][0] for name in stage.inputs}
        key = stage.key(cfg, {name: artifact.key for name, artifact in inputs.items()})
        artifact, _ = compute_artifact(stage, cfg, key, inputs, log=points.extend)
        done[stage.name] = (artifact, points)
    return done


def lineage(stage) -> str:
    """The versions of the stages upstream of `stage`, in pipeline order."""
    upstream = upstream_of([stage.name], STAGES)
    return ", ".join(f"{s.name} {s.version}" for s in STAGES if s.name in upstream)


def test_each_model_stage_writes_what_its_version_recorded(tmp_path: Path):
    chain = model_chain(tmp_path)
    found = {(s.name, s.version, lineage(s)): model_stage_digest(*chain[s.name])
             for s in STAGES if s.name not in ("ingest", "clean", "dedup")}
    changed = [key for key, digest in found.items() if key in RECORDED_MODELS and RECORDED_MODELS[key] != digest]
    unrecorded = [key for key in found if key not in RECORDED_MODELS]
    lines = "\n".join(f"    {key!r}: {digest!r}," for key, digest in found.items())
    assert not changed and not unrecorded, (
        (f"output changed under the same versions: {', '.join(k[0] for k in changed)}. Bump VERSION in the module of "
         f"the first of them (a stage's changed output changes every stage after it; those need no new version; "
         f"an edited in-context task spec in data/eval changes the evaluations alone: record them)\n" if changed else "")
        + (f"no digest recorded for {', '.join(f'{k[0]} {k[1]}' for k in unrecorded)} after these upstream "
           f"versions\n" if unrecorded else "")
        + f"then RECORDED_MODELS is:\n{lines}")
