"""The shipped studies' designs: every claim rests on something the seeds change (else its seeds are
copies of one computation and it can only ever be inconclusive), and accounting facts are preconditions."""

from __future__ import annotations

from pathlib import Path

import pytest

from jielong.flows.stages import stage_keys
from jielong.tasks.config import UserError
from jielong.flows.study import plan_study
from jielong.tasks.evaluate import EVAL_PRETRAIN
from jielong.tasks.lib.study.spec import REFERENCE, load_study, study_files
from jielong.tasks.lib.study.verdict import DRAWING, SEED_BLIND

STUDIES = sorted(study_files())


def _computation(run, reference: str) -> str:
    """What computes a metric at one seed, as stage keys (tasks/lib/study/verdict.py's VariantRun.source,
    planned instead of run)."""
    match = REFERENCE.match(reference)
    stage, name = match["stage"], match["name"]
    variant = run.variant
    keys = stage_keys(run.cfg)
    if variant.model:  # an external model: the model is fixed, the evaluation's settings may hold the seed
        if stage == "eval" and (not name.startswith(DRAWING) or name in SEED_BLIND):
            return f"model {variant.model} on {keys['dedup']}"
        return f"{keys['dedup']} {EVAL_PRETRAIN.view(run.cfg).dump()}"
    stage = variant.eval_stage if stage == "eval" else stage
    if stage == "instruct" and name.endswith("_before"):  # measured on the pretrained model
        return keys["pretrain"]
    if stage.startswith("eval_") and (not name.startswith(DRAWING) or name in SEED_BLIND):
        return keys[stage.removeprefix("eval_")]
    return keys[stage]


@pytest.mark.parametrize("name", STUDIES)
def test_every_claim_rests_on_something_the_seeds_change(name: str, tmp_path: Path):
    study, _ = load_study(name)
    _, runs = plan_study(study, 2, [f"workspace={tmp_path}"])
    by_seed = {(r.variant.name, r.seed): r for r in runs}
    for claim in study.claims:
        if claim.trend:
            measure = study.measures[claim.trend.measure]
            variants = [claim.trend.variant] if claim.trend.variant else claim.trend.variants
            refs = [(v, ref) for v in variants for x in (measure.x or [None]) for ref in measure.references(x)]
        else:
            refs = [(c.variant, ref) for c in claim.cells for ref in study.measures[c.measure].references(c.x)]
        changed = [(v, ref) for v, ref in refs
                   if _computation(by_seed[(v, 0)], ref) != _computation(by_seed[(v, 1)], ref)]
        assert changed, f"{name}: claim {claim.name!r} reads only values no seed key changes: {refs}"


def test_a_measure_an_outside_model_cannot_have_is_refused_before_anything_runs(tmp_path: Path):
    study, _ = load_study("calibration-size")
    measures = dict(study.measures)
    measures["epochs"] = measures["epochs"].model_copy(update={"variants": None})
    study = study.model_copy(update={"measures": measures})
    with pytest.raises(UserError, match="variant smollm2: measure 'epochs' reads 'pretrain:epochs', but the "
                                        "variant runs no 'pretrain' stage"):
        plan_study(study, 1, [f"workspace={tmp_path}"])


def test_no_shipped_claim_is_an_accounting_fact():
    """FLOPs, cost ratios and copy counts are preconditions: a claim on one could not come out the other way."""
    accounting = ("train_flops", "flops_over_pretrain", "tokens_per_parameter", "train_copies", "leaked_test_copies")
    for name in STUDIES:
        study, _ = load_study(name)
        for claim in study.claims:
            measures = [claim.trend.measure] if claim.trend else [c.measure for c in claim.cells]
            metrics = [study.measures[m].metric for m in measures]
            assert not [m for m in metrics if m.endswith(accounting)], f"{name}: claim {claim.name!r} is on {metrics}"


@pytest.mark.slow
def test_the_contamination_design_runs_end_to_end(prefect_server, workspace: Path):
    """The shipped contamination study on a small corpus and a few training steps, 2 seeds: the leak before
    decontamination is counted and checked as a precondition, every claim gets an interval from the
    seeds and the test documents, and the report says so."""
    import json

    from conftest import small_overrides
    from jielong.flows.study import study_flow

    outcome = study_flow(study="contamination", seeds=2,
                         overrides=small_overrides(workspace, "split.test=0.2", "split.validation=0.2"))
    results = json.loads((outcome["report"].parent / "results.json").read_text())
    (checked,) = results["context"]["preconditions"]
    assert checked["name"] == "decontamination-caught-most" and all(v < 0 for v in checked["values"])
    for verdict in outcome["verdicts"]:
        est = verdict.estimate
        assert est.low is not None and est.low < est.high and est.replicates == 2, verdict.reason
        assert "bootstrap" in est.method and "test-documents" in est.method and "validation-documents" in est.method
    assert {v.claim for v in outcome["verdicts"]} == {"leak-flatters-with-dose", "one-copy-flatters",
                                                      "decontamination-removes-the-inflation"}
    text = outcome["report"].read_text()
    assert "decontamination-caught-most" in text and "| leak4-decontaminated |" in text


@pytest.mark.slow
def test_the_dedup_memorization_design_runs_end_to_end(prefect_server, workspace: Path):
    """The shipped dedup-memorization study on a small corpus, 2 seeds: the rotation gives the second seed
    other counts for the same canaries, canaries are resampled in pairs between the arms, and the copy
    counts are preconditions."""
    import json

    from conftest import small_overrides
    from jielong.flows.study import study_flow

    canaries = "ingest.canaries={repeats: [0, 1, 2, 4, 8, 16], fraction: 0.5, min_chars: 200, max_chars: 5000}"
    outcome = study_flow(study="dedup-memorization", seeds=2, overrides=small_overrides(
        workspace, canaries, "evaluate.memorization.prefix_tokens=16", "evaluate.memorization.continuation_tokens=16"))
    results = json.loads((outcome["report"].parent / "results.json").read_text())
    assert [p["name"] for p in results["context"]["preconditions"]] == ["dedup-keeps-one", "no-dedup-keeps-all"]
    runs = {(r["variant"], r["seed"]): r["artifacts"] for r in results["runs"]}
    assert runs[("dedup-on", 0)]["ingest"] != runs[("dedup-on", 1)]["ingest"]  # the rotation is in the key
    by_claim = {v.claim: v for v in outcome["verdicts"]}
    paired = by_claim["dedup-removes-memorisation-16"].estimate
    assert paired.replicates == 2 and paired.low < paired.high and "canaries" in paired.method


def test_the_compute_optimal_report_is_written_from_its_grid(tmp_path: Path):
    """The shipped compute-optimal study concluded on manifests written here (no training): each size's
    best learning rate, N* per budget with its bootstrap interval, the exponent, and the preconditions."""
    import json
    import math

    import numpy as np

    from jielong.flows.study import conclude
    from jielong.tasks.config import load_config
    from jielong.tasks.lib.study.verdict import VariantRun

    study, path = load_study("compute-optimal")
    study = study.model_copy(update={"bootstrap": study.bootstrap.model_copy(update={"resamples": 200})})
    rng = np.random.default_rng(0)
    sizes = {"n23k": 23120, "n40k": 39672, "n60k": 59552, "n109k": 109296, "n172k": 172352, "n458k": 458400}
    runs = []
    for variant in study.variants:
        budget_name, size_name, lr_name = variant.name.split("-", 2)
        flops = float(next(s.split("=")[1] for s in variant.set if s.startswith("pretrain.flops_budget")))
        n = sizes[size_name]
        best = 0.1 * flops ** 0.5  # N* grows as C^0.5, inside every budget's grid
        for seed in range(3):
            loss = 3 + 0.1 * (math.log(n / best)) ** 2 + (0 if lr_name == "lr1e-2" else 0.05) + rng.normal(0, 0.003)
            folder = tmp_path / f"{variant.name}-{seed}"
            folder.mkdir()
            metrics = {"final_val_loss": loss, "parameters": n, "train_flops": flops * 0.995,
                       "tokens_per_parameter": flops / 6 / n / n, "epochs": 1.0, "train_tokens": 650000.0}
            (folder / "manifest.json").write_text(json.dumps({"metrics": metrics}))
            runs.append(VariantRun(variant.name, seed, {"pretrain": str(folder)}, "pretrain"))
    context = {"parent_run_id": "p", "git_commit": "0" * 40, "overrides": [], "study_file": str(path), "seconds": 1.0,
               "finished_at": "2026-12-05T00:00:00+00:00"}
    outcome = conclude(study, runs, load_config("tiny", [f"workspace={tmp_path / 'ws'}"]), context)
    results = json.loads((outcome["report"].parent / "results.json").read_text())
    budgets = results["isoflop"]["budgets"]
    assert [b["flops"] for b in budgets] == [3e11, 1e12, 2e12] and all(len(b["sizes"]) == 5 for b in budgets)
    assert all(name.endswith("lr1e-2") for b in budgets for name in b["chosen"])
    for b in budgets:
        truth = 0.1 * b["flops"] ** 0.5
        assert b["optimum"] == pytest.approx(truth, rel=0.1)
        assert b["interval"]["optimum"]["low"] < b["optimum"] < b["interval"]["optimum"]["high"]
    assert results["isoflop"]["size_exponent"] == pytest.approx(0.5, abs=0.1)
    assert [p["name"] for p in results["context"]["preconditions"]] == ["budget-is-spent", "budget-is-not-exceeded"]
    assert "isoflop.png" in {p.name for p in outcome["files"]}
