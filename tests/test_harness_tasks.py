"""lm-evaluation-harness task files as they are: the harness builds the requests (its loader, its Jinja,
its few-shot sampler), jielong's engine scores them. Checked against lm_eval's own evaluator with an HF
model over the same tiny model: every per-choice log-likelihood, acc and acc_norm."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from evaluate_fixtures import eval_corpus, tiny_model  # noqa: F401  (pytest fixtures)
from jielong.tasks.core.schema import UserError
from jielong.tasks.lib.evaluation import EvaluateConfig, harness_tasks, icl
from jielong.tasks.lib.evaluation.model import load

pytest.importorskip("lm_eval")

POLARITY = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mr-polarity"
TEMPLATE = "Review: {{sentence | trim}}\nSentiment:"


def polarity_csv(folder: Path, n_test: int = 12, n_train: int = 16) -> dict[str, Path]:
    """Short snippets of the shipped polarity data as train/test CSV files, each sentence ending in a
    space as the data ships (the template's `| trim` removes it)."""
    if not POLARITY.is_dir():
        pytest.skip(f"needs the polarity data in {POLARITY}")
    rows = []
    for label, suffix in ((0, "neg"), (1, "pos")):
        lines = (POLARITY / f"rt-polarity.{suffix}").read_text(encoding="utf-8", errors="replace").splitlines()
        rows += [{"sentence": line + " ", "label": label} for line in lines if 20 < len(line) < 70][:40]
    order = np.random.default_rng(0).permutation(len(rows))
    rows = [rows[i] for i in order]
    paths = {}
    for split, part in (("test", rows[:n_test]), ("train", rows[n_test:n_test + n_train])):
        paths[split] = folder / f"{split}.csv"
        with open(paths[split], "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, ["sentence", "label"])
            writer.writeheader()
            writer.writerows(part)
    return paths


def write_task(folder: Path, name: str, body: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(body, encoding="utf-8")
    return path


def polarity_task(folder: Path, name: str = "polarity_h") -> Path:
    data = polarity_csv(folder)
    return write_task(folder, name, f"""task: {name}
dataset_path: csv
dataset_kwargs:
  data_files:
    train: {data['train']}
    test: {data['test']}
output_type: multiple_choice
training_split: train
test_split: test
fewshot_split: train
doc_to_text: {json.dumps(TEMPLATE)}
doc_to_choice: ["negative", "positive"]
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
""")


def lm_eval_run(model_dir: Path, folder: Path, name: str, k: int, seed: int, log_samples: bool = True,
                prefix_id: int | None = None) -> dict:
    """lm_eval's own evaluator over the task (or group) `name` of `folder`, with an HF model (`prefix_id`:
    the token an empty context stands for, when not the tokenizer's BOS)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    hf = HFLM(pretrained=str(model_dir), batch_size=4, device="cpu", dtype="float32", prefix_token_id=prefix_id)
    return lm_eval.simple_evaluate(model=hf, tasks=[name], task_manager=TaskManager(include_path=str(folder), include_defaults=False),
                                   num_fewshot=k, fewshot_random_seed=seed, log_samples=log_samples, bootstrap_iters=0)


def harness_reference(model_dir: Path, folder: Path, name: str, k: int, seed: int, prefix_id: int | None = None):
    """lm_eval's own evaluator: per-document log-likelihoods, acc and acc_norm."""
    out = lm_eval_run(model_dir, folder, name, k, seed, prefix_id=prefix_id)
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    lls = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    contexts = [s["arguments"][0][0] if isinstance(s["arguments"], list) else s["arguments"]["gen_args_0"]["arg_0"]
                for s in samples]
    metrics = out["results"][name]
    return lls, contexts, metrics


def jielong_scores(model_dir: Path, task_file: Path, k: int, seed: int, prefix_id: int | None = None):
    """jielong's log-likelihoods and metrics; its own acc, acc_norm, acc_bytes (used for the answer's
    calibration) checked against the task's, which the harness's process_results computes from them."""
    lm = load(model_dir, "cpu")
    if prefix_id is not None:
        lm = dataclasses.replace(lm, prefix_id=prefix_id)
    [task] = harness_tasks.load(task_file, None)
    setting, groups = icl.build_harness_setting(lm, task, "gold", k, seed)
    icl.score_groups(lm, groups, pack_tokens=256, batch_rows=2)
    own = icl.example_metrics(setting.items, task.examples, task.spec, 10, 15)
    metrics = icl.setting_metrics(task, setting.items, 10, 15)
    for name in ("acc", "acc_norm", "acc_bytes", "perplexity"):
        if name in task.task.aggregation() and not np.isnan(own[name]):
            assert own[name] == pytest.approx(metrics[name], rel=1e-9), name
    return task, [list(item.loglik) for item in setting.items], metrics


@pytest.mark.parametrize("k", [0, 4])
def test_harness_yaml_scores_as_the_harness_does(tiny_model, tmp_path, k):
    task_file = polarity_task(tmp_path)
    seed = 3
    task, ours, metrics = jielong_scores(tiny_model, task_file, k, seed)
    theirs, contexts, reference = harness_reference(tiny_model, tmp_path, "polarity_h", k, seed)
    prompts = [context for context, _ in task.prompts("gold", k, seed)]
    assert prompts == contexts  # byte-identical, demonstrations included
    assert all(not p.split("Review: ")[-1].split("\n")[0].endswith(" ") for p in prompts)  # `| trim` applied
    if k:
        assert all(p.count("Sentiment:") == k + 1 for p in prompts)
    assert np.allclose(np.array(ours), np.array(theirs), atol=1e-4, rtol=0)
    assert metrics["acc"] == pytest.approx(reference["acc,none"], abs=1e-12)
    assert metrics["acc_norm"] == pytest.approx(reference["acc_norm,none"], abs=1e-12)


METRIC_LIST = """metric_list:
  - metric: acc
  - metric: acc_norm
  - metric: f1
  - metric: mcc
  - metric: brier_score
  - metric: exact_match
  - metric: acc_mutual_info
"""


def test_every_metric_of_the_metric_list_is_the_harness_own(tiny_model, tmp_path):
    """f1, mcc, brier_score, exact_match and acc_mutual_info, whose unconditional requests have an empty
    context: the harness puts its prefix token there (BOS, or the model's own choice), and so does jielong."""
    path = polarity_task(tmp_path)
    path.write_text(path.read_text().split("metric_list:")[0] + METRIC_LIST)
    prefix = 7  # not the tiny tokenizer's BOS (= EOS): an empty context must use the prefix, not EOS
    task, ours, metrics = jielong_scores(tiny_model, path, 2, 4, prefix_id=prefix)
    theirs, _, reference = harness_reference(tiny_model, tmp_path, "polarity_h", 2, 4, prefix_id=prefix)
    assert all(len(lls) == 4 for lls in ours)  # two choices, then each alone after the prefix token
    assert np.allclose(np.array(ours), np.array(theirs), atol=1e-4, rtol=0)
    for name in ("acc", "acc_norm", "f1", "mcc", "exact_match", "acc_mutual_info"):
        assert metrics[name] == pytest.approx(reference[f"{name},none"], abs=1e-12), name
    assert metrics["brier_score"] == pytest.approx(reference["brier_score,none"], abs=1e-5)  # from probabilities
    for mode in ("random", "none"):  # rewriting the demonstrations leaves the unconditional requests alone
        assert all([c for c, _ in reqs[2:]] == ["", ""] for reqs in task.requests(mode, 2, 0))


def test_several_gold_targets_score_as_the_harness_does(tiny_model, tmp_path):
    data = polarity_csv(tmp_path)
    path = write_task(tmp_path, "several", f"""task: several
dataset_path: csv
dataset_kwargs: {{data_files: {{train: {data['train']}, test: {data['test']}}}}}
output_type: multiple_choice
training_split: train
test_split: test
fewshot_split: train
doc_to_text: {json.dumps(TEMPLATE)}
doc_to_choice: ["negative", "positive", "mixed"]
doc_to_target: "{{{{[label, 2]}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
  - metric: exact_match
""")
    task, ours, metrics = jielong_scores(tiny_model, path, 0, 1)
    theirs, contexts, reference = harness_reference(tiny_model, tmp_path, "several", 0, 1)
    assert all(e["label"] in ([0, 2], [1, 2]) for e in task.examples)
    assert [c for c, _ in task.prompts("gold", 0, 1)] == contexts
    assert np.allclose(np.array(ours), np.array(theirs), atol=1e-4, rtol=0)
    for name in ("acc", "acc_norm", "exact_match"):
        assert metrics[name] == pytest.approx(reference[f"{name},none"], abs=1e-12), name
    # lm-eval 0.4.13 cannot write such a target into a demonstration: its own message, on one line
    with pytest.raises(UserError, match=r"could not build its requests at k = 2: AssertionError: Answer is not a string"):
        task.requests("gold", 2, 1)


@pytest.mark.parametrize("description", ["", "Classify the sentiment of each review.\n\n"])
def test_random_and_none_modes_change_only_the_answers(tmp_path, description):
    path = polarity_task(tmp_path)
    if description:
        path.write_text(path.read_text() + f"description: {json.dumps(description)}\n")
    [task] = harness_tasks.load(path, None)
    gold = [c for c, _ in task.prompts("gold", 2, 0)]
    none = [c for c, _ in task.prompts("none", 2, 0)]
    rand = [c for c, _ in task.prompts("random", 2, 0)]
    assert all(p.startswith(description) for p in gold + none + rand)
    for g, n, r in zip(gold, none, rand):
        assert g.count("Review:") == n.count("Review:") == r.count("Review:") == 3
        assert n.replace("Sentiment:\n\n", "").count("Sentiment:") == 1  # demonstrations without answers
        assert [line.split(":")[0] for line in g.splitlines()] == [line.split(":")[0] for line in r.splitlines()]
        assert g.split("\n\n")[-1] == n.split("\n\n")[-1] == r.split("\n\n")[-1]  # the same query
    assert any(g != r for g, r in zip(gold, rand))


def test_folder_with_include_and_group_runs(tiny_model, eval_corpus, tmp_path):
    data = polarity_csv(tmp_path)
    (tmp_path / "_base_template").write_text(f"""dataset_path: csv
dataset_kwargs:
  data_files:
    train: {data['train']}
    test: {data['test']}
output_type: multiple_choice
training_split: train
test_split: test
fewshot_split: train
doc_to_target: label
doc_to_choice: ["negative", "positive"]
""")
    write_task(tmp_path, "review", "include: _base_template\ntask: pol_review\ndoc_to_text: " + json.dumps(TEMPLATE) + "\n")
    write_task(tmp_path, "question", "include: _base_template\ntask: pol_question\n"
               "doc_to_text: \"{{sentence}}\\nQuestion: positive or negative?\\nAnswer:\"\n")
    write_task(tmp_path, "group", "group: polarity_group\ntask: [pol_review, pol_question]\n")
    cfg = EvaluateConfig.model_validate({"icl": {"tasks": [str(tmp_path / "group.yaml")], "shots": [0, 1],
                                                 "num_seeds": 1, "max_examples": 5}})
    prepared = icl.prepare(cfg, {}, seed=0)
    assert sorted(spec.name for spec, _ in prepared) == ["pol_question", "pol_review"]
    from_folder = icl.prepare(cfg.model_copy(update={"icl": cfg.icl.model_copy(update={"tasks": [str(tmp_path)]})}), {}, 0)
    assert sorted(spec.name for spec, _ in from_folder) == ["pol_question", "pol_review"]
    lm = load(tiny_model, "cpu")
    for spec, task in prepared:
        result = icl.evaluate_task(lm, task, [0, 1], ["gold", "random", "none"], [0], 256, 2)
        assert [(r["mode"], r["k"]) for r in result.table] == [("gold", 0), ("gold", 1), ("random", 0), ("random", 1),
                                                               ("none", 0), ("none", 1)]
        assert len(task.examples) == 5 and 0 <= result.table[0]["acc"] <= 1


def test_a_group_aggregates_its_tasks_as_the_harness_does(tiny_model, eval_corpus, tmp_path):
    """A group with aggregate_metric_list: acc weighted by each task's examples, acc_norm unweighted, against
    lm_eval's evaluator on the same group; the two tasks have 12 and 7 examples so the weights matter."""
    from jielong.tasks.lib.evaluation import evaluate_model

    data = polarity_csv(tmp_path)
    small = tmp_path / "test_small.csv"
    small.write_text("".join(data["test"].read_text(encoding="utf-8").splitlines(keepends=True)[:8]), encoding="utf-8")
    common = ("output_type: multiple_choice\ntraining_split: train\ntest_split: test\nfewshot_split: train\n"
              "doc_to_target: label\ndoc_to_choice: [\"negative\", \"positive\"]\ndataset_path: csv\n")
    write_task(tmp_path, "review", f"task: pol_review\n{common}dataset_kwargs:\n  data_files:\n    train: {data['train']}\n"
               f"    test: {data['test']}\ndoc_to_text: {json.dumps(TEMPLATE)}\n")
    write_task(tmp_path, "question", f"task: pol_question\n{common}dataset_kwargs:\n  data_files:\n    train: {data['train']}\n"
               f"    test: {small}\ndoc_to_text: \"{{{{sentence}}}}\\nQuestion: positive or negative?\\nAnswer:\"\n")
    group = write_task(tmp_path, "group", "group: polarity_group\ntask: [pol_review, pol_question]\naggregate_metric_list:\n"
                       "  - metric: acc\n    weight_by_size: true\n  - metric: acc_norm\n    weight_by_size: false\n")
    cfg = EvaluateConfig.model_validate({"perplexity": {"max_documents": 2}, "knnlm": {"enabled": False},
                                         "icl": {"tasks": [str(group)], "shots": [0, 1], "modes": ["gold"], "num_seeds": 1}})
    result = evaluate_model(tiny_model, eval_corpus, cfg, tmp_path / "out", seed=7, device="cpu")
    m = result["metrics"]
    reference = lm_eval_run(tiny_model, tmp_path, "polarity_group", 1, 7, log_samples=False)["results"]["polarity_group"]
    assert m["eval/icl/polarity_group/gold/k1/acc"] == pytest.approx(reference["acc,none"], abs=1e-12)
    assert m["eval/icl/polarity_group/gold/k1/acc_norm"] == pytest.approx(reference["acc_norm,none"], abs=1e-12)
    review, question = m["eval/icl/pol_review/gold/k1/acc"], m["eval/icl/pol_question/gold/k1/acc"]
    assert m["eval/icl/polarity_group/gold/k1/acc"] == pytest.approx((12 * review + 7 * question) / 19)
    assert "eval/icl/polarity_group/gold/k1/acc_bytes" not in m  # the group does not aggregate it
    assert "### group polarity_group" in result["report_md"].read_text()


def test_a_group_aggregating_with_its_own_function_is_refused_naming_it(tmp_path):
    polarity_task(tmp_path)
    (tmp_path / "grp_utils.py").write_text("def median(values, weights=None):\n    return sorted(values)[len(values) // 2]\n")
    group = write_task(tmp_path, "group", "group: odd_group\ntask: [polarity_h]\naggregate_metric_list:\n"
                       "  - metric: acc\n    aggregation: !function grp_utils.median\n")
    with pytest.raises(UserError, match="harness group 'odd_group'.*aggregation .* of 'acc' is not computed by jielong"):
        harness_tasks.load(group, None)


def test_generate_until_is_refused_naming_the_type(tmp_path):
    data = polarity_csv(tmp_path)
    path = write_task(tmp_path, "gen", f"""task: gen_task
dataset_path: csv
dataset_kwargs: {{data_files: {{test: {data['test']}}}}}
output_type: generate_until
test_split: test
doc_to_text: "{{{{sentence}}}}"
doc_to_target: label
""")
    cfg = EvaluateConfig.model_validate({"icl": {"tasks": [str(path)]}})
    with pytest.raises(UserError, match="output_type 'generate_until' is not scored"):
        icl.prepare(cfg, {}, seed=0)


def test_a_harness_file_is_fingerprinted_with_its_folder_and_data(tmp_path):
    from jielong.tasks.lib.evaluation.specs import spec_files

    path = polarity_task(tmp_path)
    names = {name for name, _ in spec_files(str(path))}
    assert {"polarity_h.yaml", f"data:{tmp_path / 'test.csv'}", f"data:{tmp_path / 'train.csv'}"} <= names


def test_native_spec_with_harness_keys_is_one_clear_line(tmp_path):
    path = tmp_path / "mixed.json"  # JSON: never read as a harness file
    path.write_text(json.dumps({"name": "x", "data": {"path": "a.csv"}, "choices": ["a", "b"], "chance": 0.5,
                                "doc_to_target": "label", "fewshot_split": "train"}))
    with pytest.raises(ValueError) as err:
        icl.load_spec(str(path))
    message = str(err.value)
    assert "\n" not in message and "unknown keys doc_to_target, fewshot_split" in message


def loglikelihood_task(folder: Path) -> Path:
    data = polarity_csv(folder)
    return write_task(folder, "ll_task", f"""task: ll_task
dataset_path: csv
dataset_kwargs:
  data_files:
    train: {data['train']}
    test: {data['test']}
output_type: loglikelihood
training_split: train
test_split: test
fewshot_split: train
doc_to_text: {json.dumps(TEMPLATE)}
doc_to_target: "{{{{[' negative', ' positive'][label]}}}}"
metric_list:
  - metric: acc
  - metric: perplexity
""")


def test_loglikelihood_task_scores_as_the_harness_does(tiny_model, tmp_path):
    task_file = loglikelihood_task(tmp_path)
    task, ours, metrics = jielong_scores(tiny_model, task_file, 2, 5)
    theirs, contexts, reference = harness_reference(tiny_model, tmp_path, "ll_task", 2, 5)
    assert [c for c, _ in task.prompts("gold", 2, 5)] == contexts
    assert np.allclose(np.array(ours), np.array(theirs), atol=1e-4, rtol=0)
    assert metrics["acc"] == pytest.approx(reference["acc,none"], abs=1e-12)
    assert metrics["perplexity"] == pytest.approx(reference["perplexity,none"], rel=1e-4)


GOLD_MASS = """import numpy as np


def process_results(doc, results):
    lls = np.array([ll for ll, _ in results])
    p = np.exp(lls - lls.max())
    return {"gold_mass": float(p[doc["label"]] / p.sum())}
"""


def test_a_custom_process_results_defines_the_task_metrics(tiny_model, tmp_path):
    """truthfulqa_mc2's shape: a multiple_choice task whose own function turns the choices' log-likelihoods
    into its metric (here the probability mass on the gold choice)."""
    path = polarity_task(tmp_path)
    (tmp_path / "mass_utils.py").write_text(GOLD_MASS, encoding="utf-8")
    path.write_text(path.read_text().split("metric_list:")[0] + "process_results: !function mass_utils.process_results\n"
                    "metric_list:\n  - metric: gold_mass\n    aggregation: mean\n    higher_is_better: true\n")
    task, ours, metrics = jielong_scores(tiny_model, path, 2, 3)
    theirs, _, reference = harness_reference(tiny_model, tmp_path, "polarity_h", 2, 3)
    assert np.allclose(np.array(ours), np.array(theirs), atol=1e-4, rtol=0)
    assert metrics["gold_mass"] == pytest.approx(reference["gold_mass,none"], abs=1e-5)
    assert 0 < metrics["gold_mass"] < 1 and 0 <= metrics["acc"] <= 1  # jielong's acc stays beside it


FILL_IN = """def doc_to_text(doc):
    return {"1": 0, "2": 1}[doc["answer"]]


def doc_to_target(doc):
    return doc["sentence"][doc["sentence"].index("_") + 1:].strip()


def doc_to_choice(doc):
    head = doc["sentence"][:doc["sentence"].index("_")]
    return [head + doc["option1"], head + doc["option2"]]
"""


def fill_in_task(folder: Path, n_test: int = 10, n_train: int = 12) -> Path:
    """A winogrande-shaped task (a context per choice, the choice inside the sentence, one shared
    continuation; doc_to_text gives the gold index) over polarity sentences with one word blanked:
    the other option is a word blanked in another sentence."""
    if not POLARITY.is_dir():
        pytest.skip(f"needs the polarity data in {POLARITY}")
    lines = (POLARITY / "rt-polarity.pos").read_text(encoding="utf-8", errors="replace").splitlines()
    blanked = []
    for line in lines:
        words = line.split()
        middle = [i for i, w in enumerate(words) if w.isalpha() and len(w) > 4 and 1 < i < len(words) - 2]
        if 30 < len(line) < 90 and middle:
            i = middle[0]
            blanked.append((" ".join(words[:i] + ["_"] + words[i + 1:]), words[i]))
    rows = []
    for n, ((sentence, word), (_, other)) in enumerate(zip(blanked, blanked[1:] + blanked[:1])):
        right_first = n % 2 == 0
        rows.append({"sentence": sentence, "option1": word if right_first else other,
                     "option2": other if right_first else word, "answer": "1" if right_first else "2"})
    paths = {}
    for split, part in (("test", rows[:n_test]), ("train", rows[n_test:n_test + n_train])):
        paths[split] = folder / f"fill_{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    (folder / "fill_utils.py").write_text(FILL_IN, encoding="utf-8")
    return write_task(folder, "fill_in", f"""task: fill_in
dataset_path: json
dataset_kwargs:
  data_files:
    train: {paths['train']}
    test: {paths['test']}
output_type: multiple_choice
training_split: train
test_split: test
fewshot_split: train
doc_to_text: !function fill_utils.doc_to_text
doc_to_target: !function fill_utils.doc_to_target
doc_to_choice: !function fill_utils.doc_to_choice
metric_list:
  - metric: acc
  - metric: acc_norm
""")


@pytest.mark.parametrize("k", [0, 2])
def test_a_multiple_input_task_scores_as_the_harness_does(tiny_model, tmp_path, k):
    task_file = fill_in_task(tmp_path)
    [task] = harness_tasks.load(task_file, None)
    requests = task.requests("gold", k, 7)
    assert all(len({context for context, _ in reqs}) == 2 for reqs in requests)  # a context per choice
    assert all(len({continuation for _, continuation in reqs}) == 1 for reqs in requests)
    lm = load(tiny_model, "cpu")
    setting, groups = icl.build_harness_setting(lm, task, "gold", k, 7)
    icl.score_groups(lm, groups, pack_tokens=256, batch_rows=2)
    metrics = icl.setting_metrics(task, setting.items, 10, 15)
    theirs, _, reference = harness_reference(tiny_model, tmp_path, "fill_in", k, 7)
    ours = [list(item.loglik) for item in setting.items]
    assert np.allclose(np.array(ours), np.array(theirs), atol=1e-4, rtol=0)
    assert [e["label"] for e in task.examples] == [0, 1] * 5
    own = icl.example_metrics(setting.items, task.examples, task.spec, 10, 15)  # jielong's, for the calibration
    assert (own["acc"], own["acc_norm"]) == (metrics["acc"], metrics["acc_norm"])
    assert metrics["acc"] == pytest.approx(reference["acc,none"], abs=1e-12)
    assert metrics["acc_norm"] == pytest.approx(reference["acc_norm,none"], abs=1e-12)
    assert not task.supports("random") and not task.supports("none")
    with pytest.raises(UserError, match="use modes: \\[gold\\]"):
        task.requests("random", 2, 7)


def test_a_multiple_input_task_is_evaluated_with_gold_demonstrations_only(tiny_model, tmp_path):
    [task] = harness_tasks.load(fill_in_task(tmp_path), None)
    result = icl.evaluate_task(load(tiny_model, "cpu"), task, [0, 2], ["gold", "random", "none"], [0], 256, 2)
    assert [(row["mode"], row["k"]) for row in result.table] == [("gold", 0), ("gold", 2)]
    assert all(0 <= row["acc"] <= 1 for row in result.table)


ROLLING_UTILS = """import re


def detokenize(doc):
    return re.sub(r" ([.,;:!?])", r"\\1", doc["page"])


def process_results(doc, results):
    (loglikelihood,) = results
    words = len(re.split(r"\\s+", doc["page"]))  # the raw page's words, as wikitext counts them
    size = len(doc["page"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, size),
            "bits_per_byte": (loglikelihood, size)}
"""


def rolling_task(folder: Path) -> Path:
    """A wikitext-shaped loglikelihood_rolling task: whole documents of polarity sentences (most longer than the
    tiny model's 256-token context, so they are scored in several windows), a detokenizing doc_to_target
    and a custom process_results."""
    if not POLARITY.is_dir():
        pytest.skip(f"needs the polarity data in {POLARITY}")
    lines = (POLARITY / "rt-polarity.neg").read_text(encoding="utf-8", errors="replace").splitlines()
    pages = [" ".join(lines[i : i + n]) for i, n in zip(range(0, 60, 12), (1, 12, 3, 9, 12))]
    data = folder / "pages.jsonl"
    data.write_text("".join(json.dumps({"page": page}) + "\n" for page in pages), encoding="utf-8")
    (folder / "rolling_utils.py").write_text(ROLLING_UTILS, encoding="utf-8")
    return write_task(folder, "pages", f"""task: pages
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: !function rolling_utils.detokenize
process_results: !function rolling_utils.process_results
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""")


def test_a_rolling_task_scores_whole_documents_as_the_harness_does(tiny_model, eval_corpus, tmp_path):
    from jielong.tasks.lib.evaluation import evaluate_model

    task_file = rolling_task(tmp_path)
    lm = load(tiny_model, "cpu")
    [task] = harness_tasks.load(task_file, None)
    assert max(len(ids) for ids in lm.encode(task.rolling_texts())) > 2 * lm.max_length  # several windows
    cfg = EvaluateConfig.model_validate({"perplexity": {"max_documents": 2}, "knnlm": {"enabled": False},
                                         "icl": {"tasks": [str(task_file)], "shots": [0, 2], "num_seeds": 1}})
    result = evaluate_model(tiny_model, eval_corpus, cfg, tmp_path / "out", seed=7, device="cpu")
    m = result["metrics"]
    reference = lm_eval_run(tiny_model, tmp_path, "pages", 0, 0, log_samples=False)["results"]["pages"]
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert m[f"eval/icl/pages/gold/k0/{metric}"] == pytest.approx(reference[f"{metric},none"], rel=1e-5)
    assert not any("/k2/" in name for name in m if name.startswith("eval/icl/pages/"))  # k = 0 only
    report = result["report_md"].read_text()
    assert "### pages" in report and "word_perplexity" in report and "reliability_answers.png" not in report


def test_harness_tasks_in_the_evaluation_report(tiny_model, eval_corpus, tmp_path):
    from jielong.tasks.lib.evaluation import evaluate_model

    polarity = polarity_task(tmp_path)
    polarity.write_text(polarity.read_text().split("metric_list:")[0] + METRIC_LIST)
    tasks = [str(polarity), str(loglikelihood_task(tmp_path))]
    cfg = EvaluateConfig.model_validate({
        "perplexity": {"max_documents": 2}, "knnlm": {"enabled": False},
        "icl": {"tasks": tasks, "shots": [0, 2], "num_seeds": 1, "max_examples": 6}})
    result = evaluate_model(tiny_model, eval_corpus, cfg, tmp_path / "out", seed=7, device="cpu")
    m = result["metrics"]
    assert 0 <= m["eval/icl/polarity_h/random/k2/acc"] <= 1 and "eval/icl/polarity_h/gold/k2/acc_norm" in m
    assert "eval/icl/ll_task/none/k2/perplexity" in m and "eval/icl/ll_task/random/k2/acc" not in m
    assert {"eval/icl/polarity_h/random/k2/mcc", "eval/icl/polarity_h/none/k2/acc_mutual_info"} <= set(m)
    report = result["report_md"].read_text()
    assert "### polarity_h" in report and "### ll_task" in report
    header = next(line for line in report.splitlines() if line.startswith("| mode | k | k used | acc |"))
    assert header.endswith("| f1 | mcc | exact_match | brier_score | acc_mutual_info |")  # process_results order


def test_acc_norm_divides_by_characters_and_acc_bytes_by_utf8_bytes():
    """Hand-built: 'good' (4 characters, 4 bytes) against '很好' (2 characters, 6 bytes)."""
    spec = harness_tasks.HarnessSpec("t", "multiple_choice", "t.yaml", 0.5, "")
    item = icl.Item([1], [[2], [3]], loglik=np.array([-8.0, -5.0]))  # per char: -2 vs -2.5; per byte: -2 vs -0.83
    example = {"choices": ["good", "很好"], "label": 0}
    m = icl.example_metrics([item], [example], spec, 10, 15)
    assert (m["acc"], m["acc_norm"], m["acc_bytes"]) == (0.0, 1.0, 0.0)


def test_non_ascii_choices_acc_norm_and_acc_bytes_as_the_harness(tiny_model, tmp_path):
    data = polarity_csv(tmp_path, n_test=20)
    write_task(tmp_path, "zh", f"""task: zh_task
dataset_path: csv
dataset_kwargs: {{data_files: {{test: {data['test']}}}}}
output_type: multiple_choice
test_split: test
doc_to_text: {json.dumps(TEMPLATE)}
doc_to_choice: ["a", "ab好"]
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
  - metric: acc_bytes
""")
    task, ours, metrics = jielong_scores(tiny_model, tmp_path / "zh.yaml", 0, 0)
    theirs, _, reference = harness_reference(tiny_model, tmp_path, "zh_task", 0, 0)
    assert np.allclose(np.array(ours), np.array(theirs), atol=1e-4, rtol=0)
    for name in ("acc", "acc_norm", "acc_bytes"):
        assert metrics[name] == pytest.approx(reference[f"{name},none"], abs=1e-12), name
    # the tiny model gives 'a' more per character and 'ab好' (2 + 3 bytes) more per byte: the two differ
    assert metrics["acc_norm"] != metrics["acc_bytes"]


def test_without_lm_eval_a_harness_file_says_what_to_install(tmp_path, monkeypatch):
    import sys

    path = polarity_task(tmp_path)
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", None)  # as if lm-eval were not installed
    with pytest.raises(UserError, match=r"pip install 'jielong\[harness\]'"):
        harness_tasks.load(path, None)
