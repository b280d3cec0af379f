"""evaluate: exact values on hand-built cases, agreement with reference implementations, prompt
construction rules, and one small end-to-end report on a tiny random model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from evaluate_fixtures import eval_corpus, tiny_model  # noqa: F401  (pytest fixtures)
from jielong.tasks.lib.evaluation import EvaluateConfig, calibration, evaluate_model, icl, knnlm, perplexity# noqa: F401
from jielong.tasks.lib.evaluation.config import KnnLmConfig
from jielong.tasks.lib.evaluation.model import autocast_dtype, load


# ---------------------------------------------------------------- calibration


def test_ece_equal_width_hand_built():
    # 15 equal-width bins: 0.95 and 0.97 share the last bin, 0.5 and 0.52 the bin [0.4667, 0.5333)
    conf = np.array([0.95, 0.97, 0.5, 0.52])
    correct = np.array([1, 0, 1, 1])
    expected = 0.5 * abs(0.96 - 0.5) + 0.5 * abs(0.51 - 1.0)
    assert calibration.ece_equal_width(conf, correct, 15) == pytest.approx(expected, abs=1e-12)


def test_ece_equal_mass_hand_built():
    # 4 predictions, 2 equal-mass bins: {0.1, 0.2} and {0.8, 0.9}, edge at (0.2 + 0.8) / 2
    conf = np.array([0.9, 0.1, 0.8, 0.2])
    correct = np.array([1, 0, 0, 1])
    assert list(calibration.equal_mass_edges(conf, 2)) == [0.5, 1.0]
    expected = 0.5 * abs(0.15 - 0.5) + 0.5 * abs(0.85 - 0.5)
    assert calibration.ece_equal_mass(conf, correct, 2) == pytest.approx(expected, abs=1e-12)
    # a perfectly calibrated binned predictor has ECE 0
    assert calibration.ece_equal_mass([0.5] * 4, [1, 0, 1, 0], 10) == pytest.approx(0.0)


def test_ece_equal_mass_matches_helm_binning_on_ties():
    # get_equal_bins: edges midway between array_split parts, duplicates removed, searchsorted left
    conf = np.array([0.2, 0.2, 0.2, 0.6, 0.6, 0.9])
    correct = np.array([0, 1, 0, 1, 1, 1])
    edges = calibration.equal_mass_edges(conf, 3)  # parts [0.2,0.2] [0.2,0.6] [0.6,0.9] -> 0.2, 0.6, 1.0
    assert list(edges) == [0.2, 0.6, 1.0]
    # bins: {0.2 x3} acc 1/3, {0.6 x2} acc 1, {0.9} acc 1
    expected = 3 / 6 * abs(0.2 - 1 / 3) + 2 / 6 * abs(0.6 - 1) + 1 / 6 * abs(0.9 - 1)
    assert calibration.ece_equal_mass(conf, correct, 3) == pytest.approx(expected, abs=1e-12)


def test_brier_hand_built():
    probs = np.array([[0.7, 0.2, 0.1], [0.5, 0.5, 0.0]])
    labels = np.array([0, 2])
    expected = ((0.3**2 + 0.2**2 + 0.1**2) + (0.5**2 + 0.5**2 + 1.0**2)) / 2
    assert calibration.brier_multiclass(probs, labels) == pytest.approx(expected, abs=1e-12)
    summary = calibration.calibration_metrics(probs.max(1), probs.argmax(1) == labels)
    assert summary["top_brier"] == pytest.approx(((0.7 - 1) ** 2 + 0.5**2) / 2)


def test_ece_equals_torchmetrics_on_random_inputs():
    torchmetrics = pytest.importorskip("torchmetrics")
    gen = torch.Generator().manual_seed(0)
    for trial in range(5):
        n, classes = 2000, 7
        probs = torch.softmax(torch.randn(n, classes, generator=gen) * (1 + trial), dim=-1)
        target = torch.randint(0, classes, (n,), generator=gen)
        ref = torchmetrics.classification.MulticlassCalibrationError(num_classes=classes, n_bins=15, norm="l1")
        expected = float(ref(probs, target))
        conf, pred = probs.max(-1)
        ours = calibration.ece_equal_width(conf.double().numpy(), (pred == target).numpy(), 15)
        assert ours == pytest.approx(expected, abs=1e-6)
        binary = torchmetrics.classification.BinaryCalibrationError(n_bins=15, norm="l1")
        assert calibration.ece_equal_width(conf.numpy(), (pred == target).numpy(), 15) == pytest.approx(
            float(binary(conf, (pred == target).long())), abs=1e-6)


# ---------------------------------------------------------------- perplexity


def test_summarize_hand_built_distribution():
    # 6 tokens each predicted with p = 1/4, over 3 bytes and 2 words
    s = perplexity.summarize(6 * math.log(0.25), tokens=6, n_bytes=3, words=2)
    assert s["perplexity"] == pytest.approx(4.0)
    assert s["bits_per_byte"] == pytest.approx(6 * 2 / 3)
    assert s["word_perplexity"] == pytest.approx(4.0 ** 3)
    assert perplexity.count_words("a  b\nc") == 3


@pytest.mark.parametrize("n,window,stride", [(1, 4, 4), (10, 4, 4), (10, 4, 1), (11, 5, 3), (3, 8, 8)])
def test_windows_score_every_token_once(n, window, stride):
    windows = perplexity.document_windows(n, window, stride)
    scored = [p for w in windows for p in range(w.score_from, w.end)]
    assert scored == list(range(n))
    for w in windows:
        assert w.end - w.start <= window
        if w.start > 0:
            assert w.score_from - w.start >= window - stride  # context from the second window on


def _reference_logprobs(lm, ids: list[int], window: int) -> list[float]:
    """Disjoint windows scored one at a time without packing (lm-evaluation-harness's rolling windows)."""
    x = [lm.prefix_id] + ids
    out = []
    for w in perplexity.document_windows(len(ids), window, window):
        inputs = torch.tensor([x[w.start : w.end]])
        with torch.inference_mode():
            logp = torch.log_softmax(lm.model(input_ids=inputs).logits[0].float(), -1)
        for p in range(w.score_from, w.end):
            out.append(float(logp[p - w.start, x[p + 1]]))
    return out


def test_packed_scoring_equals_unpacked(tiny_model):
    lm = load(tiny_model, "cpu")
    texts = ["Return the sum of a and b.", "x " * 150 + "end", "Short.", "A longer docstring.\n\nWith two paragraphs."]
    docs = lm.encode(texts)
    scores = perplexity.score_documents(lm, docs, window=64, stride=64, batch_tokens=256)
    expected = [lp for ids in docs for lp in _reference_logprobs(lm, ids, 64)]
    np.testing.assert_allclose(scores.logprob, expected, atol=2e-5)
    assert len(scores.logprob) == sum(len(d) for d in docs)
    # the reported perplexity is exp of the mean negative log-likelihood of those tokens
    result = perplexity.perplexity_metrics(scores, texts, ["a", "a", "b", "b"], 1)
    assert result.overall["perplexity"] == pytest.approx(math.exp(-np.mean(expected)), rel=1e-6)
    assert set(result.by_source) == {"a", "b"}


# ---------------------------------------------------------------- kNN-LM


def _toy_datastore(seed=0, n=300, d=8, vocab=5, queries=40):
    rng = np.random.default_rng(seed)
    keys = rng.normal(size=(n, d)).astype(np.float32)
    values = rng.integers(0, vocab, size=n)
    q = rng.normal(size=(queries, d)).astype(np.float32)
    targets = rng.integers(0, vocab, size=queries)
    lm_lp = np.log(rng.dirichlet(np.ones(vocab), size=queries)[np.arange(queries), targets])
    return keys, values, q, targets, lm_lp


def test_knnlm_lambda_zero_equals_base_exactly():
    keys, values, q, targets, lm_lp = _toy_datastore()
    store = knnlm.build_datastore(keys, values, KnnLmConfig(k=8))
    nb = knnlm.search(store, q, 8)
    mixed = knnlm.interpolate(lm_lp, knnlm.knn_logprob(nb, targets, 1.0), 0.0)
    assert np.array_equal(mixed, lm_lp)
    assert knnlm.perplexity_of(mixed) == knnlm.perplexity_of(lm_lp)


def test_exact_knnlm_equals_bruteforce_numpy():
    keys, values, q, targets, lm_lp = _toy_datastore(seed=1)
    k, temperature, lam, vocab = 10, 3.0, 0.3, 5
    store = knnlm.build_datastore(keys, values, KnnLmConfig(k=k))
    assert store.kind == "flat"
    nb = knnlm.search(store, q, k)
    ours = knnlm.interpolate(lm_lp, knnlm.knn_logprob(nb, targets, temperature), lam)

    d = ((q[:, None, :].astype(np.float64) - keys[None, :, :]) ** 2).sum(-1)
    nearest = np.argsort(d, axis=1)[:, :k]
    expected = []
    for i in range(len(q)):
        w = np.exp(-d[i, nearest[i]] / temperature)
        p_knn = np.zeros(vocab)
        np.add.at(p_knn, values[nearest[i]], w / w.sum())
        expected.append(np.log(lam * p_knn[targets[i]] + (1 - lam) * np.exp(lm_lp[i])))
    np.testing.assert_allclose(ours, expected, rtol=1e-5)
    assert knnlm.perplexity_of(ours) == pytest.approx(math.exp(-np.mean(expected)), rel=1e-5)


def test_ivfpq_index_with_exact_rescoring_finds_true_neighbours_mostly():
    keys, values, q, targets, lm_lp = _toy_datastore(seed=2, n=4000, d=16, queries=50)
    cfg = KnnLmConfig(k=5, flat_threshold=1000, nlist=16, m=8, nbits=4, nprobe=16, rerank=8, train_sample=4000)
    store = knnlm.build_datastore(keys, values, cfg)
    assert store.kind == "ivfpq+refine"
    nb = knnlm.search(store, q, 5)
    exact = knnlm.search(knnlm.build_datastore(keys, values, KnnLmConfig(k=5)), q, 5)
    assert np.all(np.diff(nb.distances, axis=1) >= 0)
    assert np.all(nb.distances[:, 0] >= exact.distances[:, 0] - 1e-4)  # rescored distances are exact
    # nprobe = nlist (every cell searched): the true nearest neighbour is found for nearly every query
    assert np.mean(np.isclose(nb.distances[:, 0], exact.distances[:, 0], rtol=1e-4)) >= 0.9


def test_tune_picks_best_grid_point():
    keys, values, q, targets, lm_lp = _toy_datastore(seed=3)
    store = knnlm.build_datastore(keys, values, KnnLmConfig(k=8))
    nb = knnlm.search(store, q, 8)
    tuned = knnlm.tune(lm_lp, nb, targets, [0.0, 0.5], [1.0, 2.0])
    assert tuned.val_perplexity == min(row["perplexity"] for row in tuned.grid)
    assert tuned.val_perplexity <= tuned.val_base_perplexity


# ---------------------------------------------------------------- in-context tasks


def _heldout(eval_corpus):
    from jielong.tasks.lib.evaluation import read_documents

    return {s: read_documents(eval_corpus[s]) for s in ("test", "validation")}


def test_random_label_prompt_same_demos_only_labels_change(eval_corpus):
    spec, base = icl.load_spec("next_sentence")
    task = icl.load_task(spec, base, _heldout(eval_corpus), None, seed=0)
    example = task.examples[0]
    for seed in range(5):
        demos = icl.select_demos(task.pool, 4, seed)
        gold = icl.demo_labels(demos, "gold", seed)
        rand = icl.demo_labels(demos, "random", seed)
        gold_prompt = icl.render_prompt(spec, example, demos, gold)
        rand_prompt = icl.render_prompt(spec, example, demos, rand)
        none_prompt = icl.render_prompt(spec, example, demos, icl.demo_labels(demos, "none", seed))
        for d, g, r in zip(demos, gold, rand):
            assert 0 <= r < len(d["choices"])
            assert icl.demo_block(spec, d, g).replace(d["choices"][g], "<L>", 1) == icl.demo_block(spec, d, r).replace(d["choices"][r], "<L>", 1)
        # the prompt differs only where labels were swapped
        assert gold_prompt.endswith(spec.doc_to_text(example)) and rand_prompt.endswith(spec.doc_to_text(example))
        assert none_prompt == "".join(spec.doc_to_text(d) + spec.fewshot_delimiter for d in demos) + spec.doc_to_text(example)
    # random labels are not all gold (over many demonstrations)
    demos = icl.select_demos(task.pool, len(task.pool), 0)
    assert icl.demo_labels(demos, "random", 0) != icl.demo_labels(demos, "gold", 0)


def test_api_name_masks_the_name_and_offers_distinct_names():
    from jielong.tasks.lib.evaluation.builtin_tasks import api_name

    docs = [{"id": f"stdlib:mod{i}:{name}", "text": f"Return the {name} of x. See also {name}() and {name}_x."}
            for i, name in enumerate(["dumps", "loads", "sleep", "join", "split", "floor"])]
    docs += [{"id": "stdlib:json:JSONDecoder", "text": "A class."}, {"id": "stdlib:json", "text": "A module."},
             {"id": "stdlib:os:_private", "text": "Private."}]
    examples = api_name(docs, seed=0)
    assert sorted(e["choices"][e["label"]] for e in examples) == sorted(["dumps", "loads", "sleep", "join", "split", "floor"])
    for e in examples:
        name = e["choices"][e["label"]]
        assert len(set(e["choices"])) == 4 and not any(c[:1].isupper() or c.startswith("_") for c in e["choices"])
        assert e["text"] == "Return the ... of x. See also ...() and " + name + "_x."
    assert len({e["label"] for e in examples}) > 1  # the answer is not always in one place
    assert api_name(docs[:3], seed=0) == []  # fewer functions than choices


@pytest.mark.parametrize("name", ["api_name", "docstring_kind", "next_sentence"])
def test_no_prompt_contains_the_scored_example(eval_corpus, name):
    spec, base = icl.load_spec(name)
    task = icl.load_task(spec, base, _heldout(eval_corpus), None, seed=0)
    assert task.examples and task.pool
    for seed in range(3):
        for mode in ("gold", "random", "none"):
            demos = icl.select_demos(task.pool, 16, seed)
            labels = icl.demo_labels(demos, mode, seed)
            for example in task.examples:
                assert example["id"] not in {d["id"] for d in demos}
                demo_part = "".join(icl.demo_block(spec, d, l) for d, l in zip(demos, labels))
                assert spec.doc_to_text(example) not in demo_part


@pytest.mark.parametrize("k, leading_eos", [(2, True), (2, False), (0, False)])
def test_packed_icl_scores_equal_unpacked(tiny_model, eval_corpus, k, leading_eos):
    lm = load(tiny_model, "cpu")
    spec, base = icl.load_spec("next_sentence")
    task = icl.load_task(spec, base, _heldout(eval_corpus), 3, seed=0)
    enc = icl.Encoded(lm, task)
    _, groups = icl.build_setting(lm, task, enc, "gold", k, 0, leading_eos)
    icl.score_groups(lm, groups, pack_tokens=256, batch_rows=2)
    assert sum(len(g.items) for g in groups) == 3
    for group in groups:
        assert (group.prefix[:1] == [lm.eos_id]) is leading_eos
    _assert_scored_as_alone(lm, groups)


def _assert_scored_as_alone(lm, groups) -> None:
    """Every answer's log-likelihood equals the model's on its prompt alone, unpacked."""
    for group in groups:
        for item in group.items:
            for j, cont in enumerate(item.continuations):
                x = torch.tensor([group.prefix + item.query + cont])
                with torch.inference_mode():
                    logp = torch.log_softmax(lm.model(input_ids=x).logits[0].float(), -1)
                start = x.shape[1] - len(cont)
                ref = sum(float(logp[start - 1 + t, cont[t]]) for t in range(len(cont)))
                assert item.loglik[j] == pytest.approx(ref, abs=1e-4)


# window 16: shorter than the scored windows and prompts, so packing must honour it
SLIDING_WINDOW_MODELS = {
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 16}),  # every layer slides
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",  # layer 0 full, layer 1 sliding: one mask per kind
              {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",  # sliding and full alternate; no SDPA (soft-capping): eager
               {"sliding_window": 16, "head_dim": 32}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"sliding_window": 16, "head_dim": 32, "sliding_window_pattern": 2}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"sliding_window": 16}),  # every layer slides
}


def _sliding_window_model(tokenizer_dir, directory, arch: str):
    import transformers

    config_name, model_name, extra = SLIDING_WINDOW_MODELS[arch]
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    config = getattr(transformers, config_name)(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **extra,
    )
    torch.manual_seed(0)
    getattr(transformers, model_name)(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("arch", sorted(SLIDING_WINDOW_MODELS))
def test_sliding_window_models_score_packed_as_unpacked(tiny_model, eval_corpus, tmp_path, arch):
    lm = load(_sliding_window_model(tiny_model, tmp_path, arch), "cpu")
    assert lm.model.config._attn_implementation == ("eager" if arch == "gemma2" else "sdpa")
    docs = lm.encode(["Return the sum of a and b.", "A longer docstring.\n\nWith two paragraphs. " * 6])
    scores = perplexity.score_documents(lm, docs, window=64, stride=64, batch_tokens=256)
    expected = [lp for ids in docs for lp in _reference_logprobs(lm, ids, 64)]
    np.testing.assert_allclose(scores.logprob, expected, atol=2e-5)

    spec, base = icl.load_spec("next_sentence")
    task = icl.load_task(spec, base, _heldout(eval_corpus), 3, seed=0)
    _, groups = icl.build_setting(lm, task, icl.Encoded(lm, task), "gold", 2, 0, False)
    icl.score_groups(lm, groups, pack_tokens=256, batch_rows=2)
    assert max(len(g.prefix) for g in groups) > 16
    _assert_scored_as_alone(lm, groups)


def test_file_loaders_glue_tsv_and_jsonl(tmp_path):
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\n" + "".join(f"good \"film\" {i}\t1\nbad film {i}\t0\n" for i in range(20)))
    (tmp_path / "tsv.yaml").write_text(
        "name: sst\ndata: {path: dev.tsv, fewshot_pool: 8}\ninput_field: sentence\n"
        "template: \"Review: {sentence}\\nSentiment:\"\nchoices: [negative, positive]\nlabel_values: ['0', '1']\nchance: 0.5\n")
    spec, base = icl.load_spec(str(tmp_path / "tsv.yaml"))
    task = icl.load_task(spec, base, {}, None)
    assert len(task.pool) == 8 and len(task.examples) == 32
    assert {e["id"] for e in task.pool}.isdisjoint(e["id"] for e in task.examples)
    first = next(e for e in task.examples + task.pool if e["sentence"] == 'good "film" 0')
    assert first["label"] == 1 and spec.doc_to_text(first) == 'Review: good "film" 0\nSentiment:'

    rows = [{"id": f"q{i}", "question": f"2 + {i} =", "options": [str(2 + i), str(3 + i)], "answer": str(2 + i)} for i in range(10)]
    (tmp_path / "mc.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "mc.json").write_text(json.dumps({
        "name": "add", "data": {"path": "mc.jsonl", "fewshot_pool": 3}, "input_field": "question",
        "label_field": "answer", "choices_field": "options", "chance": 0.5}))
    spec, base = icl.load_spec(str(tmp_path / "mc.json"))
    task = icl.load_task(spec, base, {}, None)
    assert all(e["label"] == 0 for e in task.examples) and len(task.examples) == 7


def _glue_files(folder, scored: int, demos: int) -> None:
    """GLUE-style `sentence<TAB>label` files: both get the same row numbers, different sentences."""
    from evaluate_fixtures import corpus_documents

    sentences = [" ".join(d["text"].split()[:12]) for d in corpus_documents()]
    sentences = list(dict.fromkeys(s for s in sentences if s and "\t" not in s))
    rows = [f"{text}\t{i % 2}\n" for i, text in enumerate(sentences[: scored + demos])]
    (folder / "dev.tsv").write_text("sentence\tlabel\n" + "".join(rows[:scored]))
    (folder / "train.tsv").write_text("sentence\tlabel\n" + "".join(rows[scored:]))
    (folder / "glue.yaml").write_text(
        "name: glue\ndata: {path: dev.tsv, fewshot_path: train.tsv}\ninput_field: sentence\n"
        "template: \"Text: {sentence}\\nLabel:\"\nchoices: [negative, positive]\nchance: 0.5\n")


def test_a_separate_demonstration_file_fills_the_pool_and_every_k_is_reported(tiny_model, tmp_path):
    _glue_files(tmp_path, 200, 200)
    spec, base = icl.load_spec(str(tmp_path / "glue.yaml"))
    task = icl.load_task(spec, base, {}, None)
    assert len(task.examples) == 200 and len(task.pool) == 200
    assert len({e["id"] for e in task.examples}) == 200  # ids unique per file: dev.tsv#1 ... dev.tsv#200
    result = icl.evaluate_task(load(tiny_model, "cpu"), task, [0, 4], ["gold", "random", "none"], [0], 512, 8)
    assert sorted((row["mode"], row["k"]) for row in result.table) == [
        ("gold", 0), ("gold", 4), ("none", 0), ("none", 4), ("random", 0), ("random", 4)]
    assert result.n_pool == 200 and all(row["k_used"] == row["k"] for row in result.table)


def test_a_k_the_pool_cannot_honour_is_an_error(tmp_path):
    from jielong.tasks.config import UserError

    _glue_files(tmp_path, 20, 3)
    spec, base = icl.load_spec(str(tmp_path / "glue.yaml"))
    task = icl.load_task(spec, base, {}, None)
    with pytest.raises(UserError, match=r"asks for k = 4 demonstrations, but its demonstration pool holds 3"):
        icl.check_shots(task, [0, 4])
    icl.check_shots(task, [0, 3])


def test_a_demonstration_file_sharing_sentences_with_the_scored_file_never_shows_them(tmp_path):
    _glue_files(tmp_path, 10, 10)
    dev = (tmp_path / "dev.tsv").read_text().splitlines()
    with (tmp_path / "train.tsv").open("a") as handle:
        handle.write("\n".join(dev[1:4]) + "\n")  # three scored sentences also among the demonstrations
    spec, base = icl.load_spec(str(tmp_path / "glue.yaml"))
    task = icl.load_task(spec, base, {}, None)
    assert len(task.pool) == 10
    assert not {spec.doc_to_text(d) for d in task.pool} & {spec.doc_to_text(e) for e in task.examples}


def test_one_file_per_label_with_text_lines(tmp_path):
    (tmp_path / "good.txt").write_text("".join(f"a fine film number {i}\n" for i in range(30)))
    (tmp_path / "bad.txt").write_text("".join(f"a dull film number {i}\n\n" for i in range(30)))  # blank lines skipped
    (tmp_path / "spec.yaml").write_text(
        "name: films\ndata: {label_files: {negative: bad.txt, positive: good.txt}, fewshot_pool: 10}\n"
        "input_field: sentence\ntemplate: \"{sentence}\\nAnswer:\"\nchoices: [negative, positive]\nchance: 0.5\n")
    spec, base = icl.load_spec(str(tmp_path / "spec.yaml"))
    task = icl.load_task(spec, base, {}, 20, seed=3)
    assert len(task.pool) == 10 and len(task.examples) == 20
    for e in task.examples + task.pool:
        assert e["label"] == (1 if "fine" in e["sentence"] else 0) and e["id"].split("#")[0] in ("good.txt", "bad.txt")
    assert 0 < sum(e["label"] for e in task.examples) < 20  # the first 20 mix both files
    assert icl.load_task(spec, base, {}, 20, seed=3).examples == task.examples


def test_the_sentence_polarity_task_reads_the_shared_data():
    spec, base = icl.load_spec("mr_polarity")
    if not (base / spec.data.label_files["positive"]).exists():
        pytest.skip("../shared/datasets/mr-polarity is not beside this checkout")
    task = icl.load_task(spec, base, {}, None, seed=1234)
    assert len(task.pool) == 64 and 10_500 < len(task.examples) <= 10_662 - 64
    assert abs(np.mean([e["label"] for e in task.examples]) - 0.5) < 0.01


def test_macro_f1():
    gold = np.array([0, 0, 1, 1, 2])
    pred = np.array([0, 1, 1, 1, 0])
    # class 0: tp1 fp1 fn1 -> 0.5; class 1: tp2 fp1 fn0 -> 0.8; class 2: tp0 -> 0
    assert icl.macro_f1(gold, pred) == pytest.approx((0.5 + 0.8 + 0.0) / 3)


# ---------------------------------------------------------------- end to end


def _small_config() -> EvaluateConfig:
    return EvaluateConfig.model_validate({
        "icl": {"shots": [0, 1, 4], "num_seeds": 2, "max_examples": 8, "pack_tokens": 512},
        "knnlm": {"k": 8, "sweep": [0.5, 1.0], "max_train_tokens": 20000},
    })


def test_evaluate_model_end_to_end(tiny_model, eval_corpus, tmp_path):
    result = evaluate_model(tiny_model, eval_corpus, _small_config(), tmp_path / "a", seed=7, device="cpu")
    m = result["metrics"]
    for name in ("eval/perplexity", "eval/bits_per_byte", "eval/word_perplexity", "eval/ece_10_bin",
                 "eval/ece_15_bin_equal_width", "eval/brier", "eval/knnlm_perplexity", "eval/knnlm_base_perplexity",
                 "eval/knnlm_perplexity_ratio", "eval/icl/next_sentence/gold/k1/acc", "eval/icl/docstring_kind/random/k4/acc_norm",
                 "eval/icl/next_sentence/none/k0/macro_f1", "eval/icl/next_sentence/ece_10_bin"):
        assert name in m and math.isfinite(m[name]), name
    assert m["eval/knnlm_base_perplexity"] == m["eval/perplexity"]
    assert m["eval/knnlm_perplexity"] <= m["eval/knnlm_base_perplexity"] + 1e-9  # lambda = 0 is in the grid
    names = {p.name for p in result["plots"]}
    assert {"reliability_tokens.png", "reliability_answers.png", "icl_next_sentence.png", "knnlm_size_sweep.png"} <= names
    assert all(p.stat().st_size > 1000 for p in result["plots"])
    report = json.loads(result["report_json"].read_text())
    assert report["knnlm"]["sweep"][-1]["size"] == report["knnlm"]["datastore_size"]
    assert "## kNN-LM" in result["report_md"].read_text()

    # the per-item values a study resamples give back each metric on the full set of items
    from jielong.tasks.lib.study.items import item_stat

    for name in ("perplexity", "nll_per_token", "ece_10_bin", "icl/next_sentence/gold/k1/acc", "icl/next_sentence/gold/k0/acc",
                 "icl/docstring_kind/random/k4/acc", "icl/next_sentence/ece_10_bin", "knnlm_perplexity",
                 "knnlm_base_perplexity", "knnlm_sweep/100pct/perplexity"):
        stat = item_stat(str(tmp_path / "a"), name)
        assert stat is not None and stat.full() == pytest.approx(m[f"eval/{name}"], rel=1e-5, abs=1e-6), name
    assert item_stat(str(tmp_path / "a"), "knnlm_lambda") is None  # a setting chosen once, not a mean over items

    again = evaluate_model(tiny_model, eval_corpus, _small_config(), tmp_path / "b", seed=7, device="cpu")
    timing = ("seconds", "tokens_per_s", "build_seconds")
    same = {k: v for k, v in m.items() if not any(t in k for t in timing)}
    assert same == {k: v for k, v in again["metrics"].items() if not any(t in k for t in timing)}


def test_precision_auto_is_bf16_on_cuda_only_and_named_settings_are_obeyed():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype(cpu, "auto") is None and autocast_dtype(cuda, "auto") is torch.bfloat16
    assert autocast_dtype(cpu, "bf16") is torch.bfloat16 and autocast_dtype(cuda, "fp32") is None


def test_bf16_evaluation_moves_perplexity_a_little_and_says_so(tiny_model, eval_corpus, tmp_path):
    cfg = EvaluateConfig.model_validate({"icl": {"enabled": False}, "knnlm": {"enabled": False}})
    fp32 = evaluate_model(tiny_model, eval_corpus, cfg, tmp_path / "fp32", seed=None, device="cpu", precision="fp32")
    bf16 = evaluate_model(tiny_model, eval_corpus, cfg, tmp_path / "bf16", seed=None, device="cpu", precision="bf16")
    exact, rounded = fp32["metrics"]["eval/perplexity"], bf16["metrics"]["eval/perplexity"]
    assert exact != rounded and abs(rounded - exact) / exact < 0.02  # bf16 keeps ~3 significant digits
    assert json.loads(bf16["report_json"].read_text())["precision"] == "bf16"


def test_config_rejects_unknown_keys():
    with pytest.raises(Exception):
        EvaluateConfig.model_validate({"knnlm": {"lamda": [0.1]}})
    cfg = EvaluateConfig()
    assert cfg.knnlm.key == "ffn_input" and cfg.icl.shots == [0, 1, 4, 8, 16]


@pytest.mark.parametrize("task_name, k", [("next_sentence", 0), ("next_sentence", 2), ("docstring_kind", 1)])
def test_icl_logliks_match_lm_evaluation_harness(tiny_model, eval_corpus, task_name, k):
    """The same prompts through lm-evaluation-harness's HFLM.loglikelihood (its own tokenization of
    context + continuation): the same log-likelihood for every choice, so the same accuracy. (Prompts
    that fit the context: where k demonstrations do not fit, jielong drops whole demonstrations and
    reports k_used, while the harness cuts tokens from the left.)"""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = load(tiny_model, "cpu")
    spec, base = icl.load_spec(task_name)
    task = icl.load_task(spec, base, _heldout(eval_corpus), 6, seed=0)
    setting, groups = icl.build_setting(lm, task, icl.Encoded(lm, task), "gold", k, 0, leading_eos=False)
    icl.score_groups(lm, groups, pack_tokens=256, batch_rows=2)
    demos = icl.select_demos(task.pool, k, 0)
    labels = icl.demo_labels(demos, "gold", 0)
    requests = [Instance("loglikelihood", e, (icl.render_prompt(spec, e, demos, labels), spec.target_delimiter + c), j)
                for e in task.examples for j, c in enumerate(spec.doc_to_choice(e))]
    harness = HFLM(pretrained=str(tiny_model), batch_size=4, device="cpu", dtype="float32")
    expected = [loglik for loglik, _ in harness.loglikelihood(requests, disable_tqdm=True)]
    ours = [float(ll) for item in setting.items for ll in item.loglik]
    assert setting.k_used == [k] * len(task.examples)
    assert ours == pytest.approx(expected, abs=1e-4)
