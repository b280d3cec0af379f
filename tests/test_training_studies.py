"""What the training studies build on: the C = 6·N·D accounting, pretrain.flops_budget, model shapes,
canaries (ingest.canaries) and their memorisation (evaluate.memorization), and the IsoFLOP fit."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from conftest import read_group, run_chain, small_overrides
from jielong.tasks.config import ConfigError, load_config


# ---------------------------------------------------------------- FLOPs


def tiny_parameters_by_hand(vocab: int) -> int:
    """The tiny preset (d 128, 4 layers, SwiGLU 384, 4 heads of 32, tied embedding), counted by hand."""
    d, layers, ffn = 128, 4, 384
    attention = 4 * d * d  # q, k, v, o: as many key/value heads as query heads
    mlp = 3 * d * ffn  # gate, up, down
    norms = 2 * d  # before attention, before the MLP
    return vocab * d + layers * (attention + mlp + norms) + d  # + the final norm; the output layer is the embedding


def test_training_flops_match_a_hand_count_for_the_tiny_preset():
    from jielong.models.flops import steps_for_budget, training_flops
    from jielong.models.presets import build_model, count_parameters, model_config

    assert tiny_parameters_by_hand(4096) == 1_377_408
    model = build_model(model_config("tiny", 4096, 1, 2, 0), seed=0)
    assert count_parameters(model) == 1_377_408
    # 300 steps of 16 sequences of 256 tokens: D = 1,228,800 tokens, C = 6 N D
    assert training_flops(1_377_408, 300 * 16 * 256) == 6 * 1_377_408 * 1_228_800 == 10_155_353_702_400
    # a budget buys whole steps only: 1e13 FLOPs of 4,096-token steps for this model
    per_step = 6 * 1_377_408 * 4096
    assert steps_for_budget(1e13, 1_377_408, 4096) == int(1e13 // per_step) == 295
    assert steps_for_budget(1.0, 1_377_408, 4096) == 1


def test_model_shape_settings_change_the_model_and_enter_the_pretrain_key_only_when_set():
    from jielong.flows.stages import STAGES
    from jielong.models.presets import build_model, count_parameters, model_config

    pretrain = next(s for s in STAGES if s.name == "pretrain")
    plain, shaped = load_config("tiny", []), load_config("tiny", ["model.hidden_size=64", "model.num_heads=2"])
    assert pretrain.key(plain, {"tokenize": "k"}) != pretrain.key(shaped, {"tokenize": "k"})
    assert "hidden_size" not in str(pretrain.view(plain).output_dump())
    model = build_model(model_config("tiny", 4096, 1, 2, 0, shape=shaped.model.shape_overrides()), seed=0)
    d = 64
    assert count_parameters(model) == 4096 * d + 4 * (4 * d * d + 3 * d * 384 + 2 * d) + d
    with pytest.raises(ConfigError, match="even size"):
        load_config("tiny", ["model.hidden_size=96", "model.num_heads=5"])
    with pytest.raises(ConfigError, match="brings its own architecture"):
        load_config("tiny", ["model.init_from=builtin:smollm2-135m-instruct", "model.num_layers=2"])


# ---------------------------------------------------------------- canaries and memorisation


@pytest.mark.slow  # ingest -> eval_pretrain twice, on 300 modules of the built-in corpus
def test_canaries_are_injected_counted_split_and_measured(tmp_path: Path):
    """Copies reconcile in ingest; with dedup off train holds every copy, with it one; the never-seen
    controls are in test; the memorisation evaluation measures each repeat count."""
    canaries = ["ingest.sources=[{kind: builtin, limit: 300}]", "ingest.canaries={fraction: 0.3, min_chars: 400}"]
    off = load_config("tiny", small_overrides(tmp_path / "off", *canaries, "dedup.exact=false", "dedup.near.enabled=false"))
    from jielong.flows.stages import STAGES

    artifacts = run_chain(off, "dedup")
    ingest = artifacts["ingest"].manifest
    by_repeats = {int(r): n for r, n in ingest["details"]["canaries"]["by_repeats"].items()}
    assert set(by_repeats) == {0, 1, 2, 4, 8, 16, 32} and all(n > 0 for n in by_repeats.values())
    extra = sum(max(r, 1) * n for r, n in by_repeats.items()) - sum(by_repeats.values())
    assert ingest["metrics"]["canary_extra_copies"] == extra
    assert ingest["counts"]["documents_out"] == ingest["counts"]["documents_in"]
    ids = {split: read_group(artifacts["dedup"], split)["id"].tolist() for split in ("train", "validation", "test")}
    assert not any(i.startswith("canary:") for i in ids["validation"])
    assert all(i.startswith("canary:0:") for i in ids["test"] if i.startswith("canary:"))
    train_copies = [i for i in ids["train"] if i.startswith("canary:")]
    assert all(not i.startswith("canary:0:") for i in train_copies)
    # with dedup off, a canary of 32 repeats that survived cleaning is in train 32 times
    originals_32 = {i.split(":", 3)[3] for i in train_copies if i.startswith("canary:32:")}
    assert originals_32 and len([i for i in train_copies if i.startswith("canary:32:")]) == 32 * len(originals_32)

    on = load_config("tiny", small_overrides(tmp_path / "on", *canaries, "evaluate.memorization.enabled=true",
                                             "evaluate.memorization.prefix_tokens=16",
                                             "evaluate.memorization.continuation_tokens=16",
                                             "evaluate.icl.enabled=false", "evaluate.knnlm.enabled=false"))
    artifacts = run_chain(on, "eval_pretrain")
    train = read_group(artifacts["dedup"], "train")["id"].tolist()
    originals = [i.split(":", 3)[3] for i in train if i.startswith("canary:")]
    assert len(originals) == len(set(originals))  # deduplication kept one copy of each
    metrics = artifacts["eval_pretrain"].manifest["metrics"]
    for repeats in (0, 1, 32):
        assert 0 <= metrics[f"memorization/r{repeats}/token_match"] <= 1
        assert metrics[f"memorization/r{repeats}/canaries"] > 0
    assert metrics["memorization/r0/train_copies"] == 0 and metrics["memorization/r32/train_copies"] == 1
    assert metrics["memorization/r1/continuation_loss"] > 0
    # the dedup key is unchanged by the canary code when no canary is injected
    plain = load_config("tiny", small_overrides(tmp_path / "on"))
    dedup = next(s for s in STAGES if s.name == "dedup")
    assert "canaries" not in str(dedup.view(plain).output_dump())


def test_memorization_without_canaries_is_a_message(tmp_path: Path):
    from jielong.tasks.lib.evaluation import memorization

    with pytest.raises(ValueError, match="no canaries"):
        memorization.evaluate(type("LM", (), {"max_length": 256})(), {"train": [{"id": "a", "text": "x"}]},
                              load_config("tiny", ["evaluate.memorization.enabled=true"]).evaluate.memorization, 16384)


def test_canary_ids_round_trip():
    from jielong.tasks.lib import canaries

    document = {"id": "stdlib/json/__init__.py", "text": "t", "source": "s"}
    copies = canaries.copies(document, 4)
    assert [c["id"] for c in copies] == [f"canary:4:{k}:stdlib/json/__init__.py" for k in range(4)]
    assert canaries.parse(copies[2]["id"]) == (4, "stdlib/json/__init__.py")
    assert canaries.forced_split(canaries.copies(document, 0)[0]["id"]) == "test"
    assert canaries.forced_split(copies[0]["id"]) == "train" and canaries.forced_split("other") is None


# ---------------------------------------------------------------- the IsoFLOP fit


def test_the_parabola_vertex_is_the_loss_optimal_size_and_edges_give_none():
    from jielong.tasks.lib.study.isoflop import parabola_vertex

    sizes = [1e5, 3e5, 1e6, 3e6]
    n_star = 5e5
    losses = [2.0 + 0.3 * (math.log(n) - math.log(n_star)) ** 2 for n in sizes]
    found, why = parabola_vertex(sizes, losses)
    assert found == pytest.approx(n_star, rel=1e-6) and why == ""
    falling = [2.0 + 0.01 * (math.log(n) - math.log(1e8)) ** 2 for n in sizes]  # the optimum lies beyond the grid
    assert math.isnan(parabola_vertex(sizes, falling)[0]) and "above the largest" in parabola_vertex(sizes, falling)[1]
    concave = [2.0, 2.5, 2.5, 2.0]
    assert "not convex" in parabola_vertex(sizes, concave)[1]


def test_a_canary_rotation_shifts_every_count_along_the_list_and_keeps_the_canaries():
    """`ingest.canaries.rotation` r gives each canary the count r places further along `repeats`: the same
    documents are canaries, and over len(repeats) rotations each is seen at every count."""
    from jielong.tasks.ingest import CanaryConfig
    from jielong.tasks.lib.canaries import repeats_of

    base = CanaryConfig(repeats=[0, 1, 2, 4], fraction=0.5, min_chars=1, max_chars=100)
    ids = [f"stdlib:mod{i}" for i in range(200)]
    counts = {r: [repeats_of(i, "some text", base.model_copy(update={"rotation": r})) for i in ids] for r in range(4)}
    chosen = [c is not None for c in counts[0]]
    assert 50 < sum(chosen) < 150 and all([c is not None for c in counts[r]] == chosen for r in range(4))
    order = base.repeats
    for i, first in enumerate(counts[0]):
        if first is not None:
            assert [counts[r][i] for r in range(4)] == [order[(order.index(first) + r) % 4] for r in range(4)]
    # rotation 0 stays out of the ingest key: existing canary artifacts keep their keys
    from jielong.tasks import ingest

    plain = load_config("tiny", ["ingest.canaries={fraction: 0.1}"])
    rotated = load_config("tiny", ["ingest.canaries={fraction: 0.1, rotation: 1}"])
    assert "rotation" not in str(ingest.STAGE.view(plain).output_dump())
    assert "rotation" in str(ingest.STAGE.view(rotated).output_dump())


def test_the_isoflop_fit_chooses_each_sizes_learning_rate_and_bootstraps_the_exponent(tmp_path: Path):
    """Two budgets x five sizes x two learning rates on manifests written here: losses are a parabola in
    ln N around N* = 0.3 * sqrt(C) (exponent 0.5), plus 0.2 for the worse learning rate and a little seed
    noise. The fit picks the better rate at every size, finds N*, and its bootstrap interval holds the truth."""
    import json as _json

    import numpy as np

    from jielong.tasks.lib.study import isoflop
    from jielong.tasks.lib.study.spec import Study
    from jielong.tasks.lib.study.verdict import Table, VariantRun

    rng = np.random.default_rng(1)
    budgets = {1e10: [1e4, 2e4, 3e4, 5e4, 8e4], 1e11: [3e4, 6e4, 1e5, 1.6e5, 2.5e5]}
    variants, runs, groups = [], [], {}
    for flops, sizes in budgets.items():
        truth = 0.3 * flops ** 0.5
        for n in sizes:
            for lr, penalty in (("good", 0.0), ("bad", 0.2)):
                name = f"c{int(math.log10(flops))}-n{int(n)}-{lr}"
                variants.append({"name": name, "x": n})
                groups.setdefault(flops, []).append(name)
                for seed in range(4):
                    loss = 3.0 + 0.2 * (math.log(n) - math.log(truth)) ** 2 + penalty + rng.normal(0, 0.005)
                    folder = tmp_path / f"{name}-{seed}"
                    folder.mkdir()
                    (folder / "manifest.json").write_text(_json.dumps({"metrics": {"final_val_loss": loss}}))
                    runs.append(VariantRun(name, seed, {"pretrain": str(folder)}, "pretrain"))
    study = Study.model_validate({
        "name": "t", "title": "t", "notes": "n", "experiment": "e", "limits": "l", "cost": "c", "variants": variants,
        "measures": {"loss": {"metric": "pretrain:final_val_loss"}},
        "claims": [{"name": "c", "statement": "s", "compare": {"a": {"variant": variants[0]["name"], "measure": "loss"}, "op": ">", "margin": 0}}],
        "isoflop": {"loss": "loss", "budgets": [{"flops": c, "variants": v} for c, v in groups.items()]},
        "bootstrap": {"resamples": 200}})
    table = Table(study, runs)
    fits = isoflop.fit_budgets(study, table)
    boot = isoflop.bootstrap(fits, 4, 200, 3)
    for fit, (flops, _) in zip(fits, budgets.items()):
        assert all(name.endswith("-good") for name in fit.chosen)
        truth = 0.3 * flops ** 0.5
        assert fit.optimum == pytest.approx(truth, rel=0.05)
        assert fit.interval["optimum"]["low"] <= truth * 1.02 and truth * 0.98 <= fit.interval["optimum"]["high"]
        assert fit.interval["optimum"]["without"] == 0.0
    exponent = isoflop.size_exponent([(f.flops, f.optimum) for f in fits])
    assert exponent == pytest.approx(0.5, abs=0.03)
    # seed noise of 0.005 leaves a narrow interval around the fitted exponent (the truth within fitting error)
    assert boot["exponent"]["low"] - 0.01 <= 0.5 <= boot["exponent"]["high"] + 0.01
    assert 0 < boot["exponent"]["high"] - boot["exponent"]["low"] < 0.1
    lines = "\n".join(isoflop.report_lines(fits, boot, None, exponent))
    assert f"a = {exponent:.3g}, 95% interval" in lines and "rechosen" in lines


# ---------------------------------------------------------------- the instruction-tuning control


def test_the_replies_objective_trains_on_the_reply_text_alone():
    from jielong.tasks.instruct import encode_reply

    class Words:  # a tokenizer of whitespace-separated words, ids by first appearance
        eos_token_id = 0

        def __init__(self):
            self.vocab: dict[str, int] = {}

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [self.vocab.setdefault(w, len(self.vocab) + 1) for w in text.split()]}

    tokenizer = Words()
    conversation = [{"role": "user", "content": "what does it do"}, {"role": "assistant", "content": "it sorts the list"}]
    ids, targets = encode_reply(conversation, tokenizer, 256)
    reply = tokenizer("it sorts the list")["input_ids"]
    assert ids == [0, *reply] and targets == [*reply, 0]  # no prompt token, every next token trained
    assert encode_reply(conversation, tokenizer, 3) == ([0, *reply[:2]], reply[:3])


def test_an_instruct_flops_budget_counts_the_padded_batches_it_will_train_on():
    """steps_for_flops walks PairBatches' own order: the steps it allows cost at most the budget, one more
    would exceed it."""
    import random

    from jielong.models.data import PairBatches
    from jielong.tasks.instruct import steps_for_flops

    rng = random.Random(0)
    examples = [([1] * n, [1] * n) for n in (rng.randint(5, 60) for _ in range(37))]
    batches = PairBatches(examples, examples[:4], 0, batch_size=4, grad_accum=2, seed=3, eval_batches=1)

    def flops(steps: int) -> float:
        return sum(6 * 1000 * batches.get(s, m)["input_ids"].numel() for s in range(steps) for m in range(2))

    budget = flops(25) + 1.0
    steps = steps_for_flops([len(ids) for ids, _ in examples], 4, 2, 3, 1000, budget)
    assert steps == 25 and flops(steps) <= budget < flops(steps + 1)
