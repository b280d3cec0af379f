"""`jielong study`: study files, verdict rules, and a small study end to end through Prefect and MLflow."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import small_overrides
from jielong.tasks.config import UserError, load_config
from jielong.tasks.lib.study.spec import load_study, study_files
from jielong.tasks.lib.study.verdict import HELD, INCONCLUSIVE, NOT_HELD, Table, compare_values, judge


# ---------------------------------------------------------------- verdict rules


def test_compare_is_held_only_when_the_interval_excludes_the_margin():
    assert compare_values([1.0, 1.1, 0.9], [0.0, 0.1, -0.1], ">", 0)[0] == HELD
    assert compare_values([1.0, 1.1, 0.9], [0.0, 0.1, -0.1], "<", 0)[0] == NOT_HELD
    # the arms differ by 0.1 on average, but the seeds disagree: the interval holds 0
    assert compare_values([0.5, 0.9], [0.6, 0.6], ">", 0)[0] == INCONCLUSIVE
    # one seed: no interval, whatever the difference
    verdict, estimate, reason = compare_values([5.0], [1.0], ">", 0)
    assert verdict == INCONCLUSIVE and estimate.mean == 4.0 and "one replicate" in reason
    # a margin: "gold - random < 0.05" with a difference of about 0.02
    assert compare_values([0.80, 0.82, 0.81], [0.78, 0.80, 0.79], "<", 0.05)[0] == HELD
    assert compare_values([0.90, 0.92, 0.91], [0.78, 0.80, 0.79], "<", 0.05)[0] == NOT_HELD


def test_the_interval_is_the_t_interval_of_the_paired_differences():
    _, estimate, _ = compare_values([3.0, 5.0, 7.0], [1.0, 1.0, 1.0], ">", 0)
    # differences 2, 4, 6: mean 4, sd 2, t(0.975, 2) = 4.303
    assert estimate.mean == pytest.approx(4.0)
    assert estimate.high - estimate.mean == pytest.approx(4.3027 * 2 / 3 ** 0.5, rel=1e-4)


def test_a_compare_without_b_holds_a_against_the_margin(tmp_path: Path):
    from jielong.tasks.lib.study.verdict import VariantRun

    study, _ = load_study(str(write_study(tmp_path, claims=[
        {"name": "below", "statement": "s", "compare": {"a": {"variant": "a", "measure": "ppl"}, "op": "<", "margin": 10}},
        {"name": "above", "statement": "s", "compare": {"a": {"variant": "a", "measure": "ppl"}, "op": ">", "margin": 10}}])))
    runs = []
    for seed, value in enumerate([4.0, 5.0, 6.0]):
        for variant in ("a", "b"):
            folder = tmp_path / f"{variant}{seed}"
            folder.mkdir()
            (folder / "manifest.json").write_text(json.dumps({"metrics": {"perplexity": value}}))
            runs.append(VariantRun(variant, seed, {"eval_pretrain": str(folder)}, "eval_pretrain"))
    below, above = judge(study, Table(study, runs))
    assert (below.verdict, above.verdict) == (HELD, NOT_HELD)
    assert below.rule == "ppl[a] < 10"


# ---------------------------------------------------------------- study files


def test_the_shipped_studies_load_and_plan(tmp_path: Path):
    from jielong.flows.study import plan_study

    files = study_files()
    assert {"knnlm-datastore", "icl-labels", "calibration-size", "contamination", "dedup-memorization",
            "compute-optimal", "instruction-tuning-cost"} <= set(files)
    for name in files:
        study, _ = load_study(name)
        assert study.cost and study.limits and study.notes
        _, runs = plan_study(study, study.seeds, [f"workspace={tmp_path}"])
        assert len(runs) == len(study.variants) * study.seeds
        # seed s moves every seed key by s, from the variant's own value
        for key in study.seed_keys:
            first, second = (r for r in runs if r.variant is study.variants[0] and r.seed in (0, 1))
            assert _get(second.cfg, key) == _get(first.cfg, key) + 1


def _get(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def write_study(folder: Path, **changes) -> Path:
    study = {
        "name": "fixture", "title": "t", "notes": "n", "experiment": "e", "limits": "l", "cost": "c",
        "variants": [{"name": "a"}, {"name": "b", "set": ["pretrain.steps=4"]}],
        "measures": {"ppl": {"metric": "eval:perplexity"}},
        "claims": [{"name": "c", "statement": "s", "compare": {"a": {"variant": "a", "measure": "ppl"}, "op": ">",
                                                                 "b": {"variant": "b", "measure": "ppl"}}}],
    }
    study.update(changes)
    path = folder / f"{study['name']}.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


@pytest.mark.parametrize("changes, message", [
    ({"claims": [{"name": "c", "statement": "s", "compare": {"a": {"variant": "zz", "measure": "ppl"}, "op": ">",
                                                              "b": {"variant": "b", "measure": "ppl"}}}]},
     "names variant 'zz'"),
    ({"measures": {"ppl": {"metric": "perplexity"}}}, "not a metric reference"),
    ({"measures": {"ppl": {"metric": "eval:knnlm_sweep/{x}pct/perplexity"}}}, "exactly when the measure has an x list"),
    ({"claims": [{"name": "c", "statement": "s", "trend": {"measure": "ppl", "variant": "a", "direction": "decreasing"}}]},
     "two or more x values"),
    ({"claims": [{"name": "c", "statement": "s"}]}, "exactly one rule"),
    ({"variants": [{"name": "a"}, {"name": "a"}]}, "repeated: ['a']"),
    ({"isoflop": {"loss": "nope", "budgets": [{"flops": 1e12, "variants": ["a", "b", "a"]}]}}, "isoflop: loss 'nope'"),
    ({"isoflop": {"loss": "ppl", "budgets": [{"flops": 1e12, "variants": ["a", "b", "a"]}]}}, "needs an x, its size"),
])
def test_a_study_mistake_is_one_message(tmp_path: Path, changes, message):
    with pytest.raises(UserError, match="study .*fixture.yaml") as err:
        load_study(str(write_study(tmp_path, **changes)))
    assert message in str(err.value)


def test_unknown_study_and_bad_variant_config_are_messages(tmp_path: Path):
    from jielong.flows.study import plan_study

    with pytest.raises(UserError, match="no study named 'nope'.*known: .*knnlm-datastore"):
        load_study("nope")
    study, _ = load_study(str(write_study(tmp_path, variants=[{"name": "a", "set": ["pretrain.stepz=3"]}, {"name": "b"}])))
    with pytest.raises(UserError, match="variant a: .*stepz"):
        plan_study(study, 2, [])
    study, _ = load_study(str(write_study(tmp_path, seed_keys=["pretrain.lr"])))
    with pytest.raises(UserError, match="not an integer setting"):
        plan_study(study, 2, [])


def test_study_list_shows_every_study_and_its_cost():
    from jielong.flows.cli import app

    result = CliRunner().invoke(app, ["study", "--list"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    for name in ("knnlm-datastore", "icl-labels", "calibration-size", "contamination"):
        assert name in result.output
    assert "min on 2 CPU cores" in result.output


# ---------------------------------------------------------------- end to end


FIXTURE_SET = [
    "evaluate.icl.enabled=false", "evaluate.knnlm.enabled=false", "evaluate.perplexity.validation=true",
    "pretrain.warmup_steps=1",
]


def fixture_study(folder: Path, workspace: Path, long_set: list[str]) -> Path:
    """Two training lengths of the tiny model on a small corpus; a true claim, a false one and a trend."""
    return write_study(
        folder, name="fixture", seeds=2, seed_keys=["seed"],
        set=[*small_overrides(workspace), *FIXTURE_SET],
        variants=[{"name": "short", "set": ["pretrain.steps=2"], "x": 2},
                  {"name": "long", "set": ["pretrain.steps=4", *long_set], "x": "pretrain:parameters"}],
        measures={"ppl": {"metric": "eval:perplexity", "label": "test perplexity"},
                  "leak": {"metric": "eval:perplexity", "over": "eval:validation/perplexity"}},
        claims=[
            {"name": "training-helps", "statement": "more steps, lower perplexity",
             "compare": {"a": {"variant": "long", "measure": "ppl"}, "op": "<", "b": {"variant": "short", "measure": "ppl"}}},
            {"name": "false-claim", "statement": "more steps, higher perplexity (false)",
             "compare": {"a": {"variant": "long", "measure": "ppl"}, "op": ">", "b": {"variant": "short", "measure": "ppl"}}},
        ],
        plots=[{"measure": "ppl"}, {"kind": "reliability"}],
    )


def child_runs(workspace: Path, parent_id: str) -> dict[str, list[str]]:
    """Each variant run under a study run: the names of its stage runs."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("jielong").experiment_id

    def children(run_id: str) -> list:
        return client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{run_id}'")

    return {run.info.run_name: sorted(r.info.run_name for r in children(run.info.run_id)) for run in children(parent_id)}


@pytest.mark.slow
def test_a_study_runs_its_variants_under_one_parent_run_and_computes_verdicts(prefect_server, tmp_path: Path,
                                                                             workspace: Path):
    from jielong.flows.study import study_flow

    path = fixture_study(tmp_path, workspace, [])
    outcome = study_flow(study=str(path), seeds=2)
    # the second seed's stages are all cache hits: one independent value per arm, and the interval comes
    # from resampling the test documents (paired between the arms), of non-zero width
    verdicts = {v.claim: v for v in outcome["verdicts"]}
    assert {c: v.verdict for c, v in verdicts.items()} == {"training-helps": HELD, "false-claim": NOT_HELD}
    for v in verdicts.values():
        assert v.estimate.replicates == 1 and v.estimate.low < v.estimate.high, v.reason
        assert "seed 1 repeats" in v.reason and "test-documents" in v.estimate.method
    # the same fixture without item-level resampling: two copies of one value, every claim inconclusive
    copies, _ = load_study(str(path))
    copies = copies.model_copy(update={"bootstrap": copies.bootstrap.model_copy(update={"items": False})})
    for v in judge(copies, Table(copies, outcome["runs"])):
        assert v.verdict == INCONCLUSIVE and "one independent value" in v.reason, v.reason
        # the artifact is named stage/key, without the workspace's path
        assert re.search(r"seed 1 repeats .* from \w+/[0-9a-f]{8,}", v.reason), v.reason
        assert str(workspace) not in v.reason

    report = outcome["report"]
    assert report == workspace / "studies" / "fixture" / "report.md"
    text = report.read_text()
    assert "**HELD**" in text and "**NOT HELD**" in text and "more steps, higher perplexity (false)" in text
    results = json.loads((report.parent / "results.json").read_text())
    cells = {(c["variant"], c["measure"]): c for c in results["cells"]}
    assert cells[("long", "ppl")]["mean"] < cells[("short", "ppl")]["mean"]
    assert len(cells[("long", "leak")]["values"]) == 2
    assert sorted(p.name for p in report.parent.glob("*.png")) == ["01_ppl.png", "02_reliability_tokens.png"]

    first = child_runs(workspace, outcome["parent_run_id"])
    assert sorted(first) == ["fixture/long/seed0", "fixture/long/seed1", "fixture/short/seed0", "fixture/short/seed1"]
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    parent = client.get_run(outcome["parent_run_id"])
    assert parent.info.run_name == "study-fixture" and parent.data.tags["jielong.verdict.false-claim"] == NOT_HELD
    variants = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert parent.data.tags["jielong.kind"] == "study" and {r.data.tags["jielong.kind"] for r in variants} == {"study_variant"}
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"report.md", "results.json", "01_ppl.png"}

    # every stage is computed once per variant: a perplexity-only evaluation draws nothing, so `seed` (the
    # study's seed key) is not in its key, and the second seed's runs are all cache hits
    assert "8 stages computed and 16 cache hits" in text
    # a rerun of the finished study is all cache hits
    again = study_flow(study=str(path), seeds=2)
    assert "0 stages computed and 24 cache hits" in again["report"].read_text()
    assert all(name.endswith("(cached)") for stages in child_runs(workspace, again["parent_run_id"]).values()
               for name in stages)

    # without items, one seed cannot separate the arms: seed 0 alone is inconclusive
    seed_zero = [run for run in outcome["runs"] if run.seed == 0]
    assert {v.verdict for v in judge(copies, Table(copies, seed_zero))} == {INCONCLUSIVE}

    # one override of one variant recomputes that variant's affected stages only
    changed = study_flow(study=str(fixture_study(tmp_path, workspace, ["evaluate.perplexity.batch_tokens=4096"])), seeds=2)
    ran = {variant: [s for s in stages if not s.endswith("(cached)")]
           for variant, stages in child_runs(workspace, changed["parent_run_id"]).items()}
    assert ran == {"fixture/long/seed0": ["eval_pretrain"], "fixture/long/seed1": [],
                   "fixture/short/seed0": [], "fixture/short/seed1": []}


def test_a_trend_holds_only_when_every_step_does(tmp_path: Path):
    """A trend along a measure's x list, on manifests written here: one seed per column of `values`."""
    from jielong.tasks.lib.study.spec import Study
    from jielong.tasks.lib.study.verdict import VariantRun

    def verdict_of(values: list[list[float]]) -> tuple[str, list[str]]:
        runs = []
        for seed, column in enumerate(zip(*values)):
            folder = tmp_path / f"{len(list(tmp_path.iterdir()))}"
            folder.mkdir()
            (folder / "manifest.json").write_text(json.dumps({"metrics": {f"m{x}": v for x, v in zip((1, 2, 3), column)}}))
            runs.append(VariantRun("v", seed, {"eval_pretrain": str(folder)}, "eval_pretrain"))
        study = Study.model_validate({
            "name": "t", "title": "t", "notes": "n", "experiment": "e", "limits": "l", "cost": "c",
            "variants": [{"name": "v"}], "measures": {"m": {"metric": "eval:m{x}", "x": [1, 2, 3]}},
            "claims": [{"name": "falls", "statement": "s", "trend": {"measure": "m", "variant": "v", "direction": "decreasing"}}]})
        verdict = judge(study, Table(study, runs))[0]
        return verdict.verdict, [step["verdict"] for step in verdict.steps]

    assert verdict_of([[3.0, 3.1, 2.9], [2.0, 2.1, 1.9], [1.0, 1.1, 0.9]]) == (HELD, [HELD, HELD])
    assert verdict_of([[3.0, 3.1, 2.9], [2.0, 2.1, 1.9], [2.5, 2.6, 2.4]]) == (NOT_HELD, [HELD, NOT_HELD])
    assert verdict_of([[3.0, 3.1, 2.9], [2.0, 2.1, 1.9], [2.0, 1.0, 2.9]]) == (INCONCLUSIVE, [HELD, INCONCLUSIVE])
    assert verdict_of([[3.0], [2.0], [1.0]])[0] == INCONCLUSIVE  # one seed


def test_the_report_is_computed_from_the_variants_manifests(tmp_path: Path):
    """The report of a study (flows/study.py's conclude: tasks/lib/study/report.py) on manifests and
    evaluation reports written here, without training: verdicts, the numbers as mean ± 95% t-interval
    half-width, per-seed values, the plots (a measure across variants, one along an x list, a
    reliability diagram) and results.json."""
    from jielong.flows.study import conclude
    from jielong.tasks.lib.study.verdict import VariantRun

    path = write_study(
        tmp_path, variants=[{"name": "small", "x": 1}, {"name": "large", "x": 2}],
        measures={"ppl": {"metric": "eval:perplexity", "label": "test perplexity"},
                  "sweep": {"metric": "eval:knnlm_sweep/{x}pct/perplexity", "x": [50, 100], "x_label": "datastore %"}},
        claims=[{"name": "size-helps", "statement": "the larger model has the lower perplexity",
                 "compare": {"a": {"variant": "large", "measure": "ppl"}, "op": "<", "b": {"variant": "small", "measure": "ppl"}}},
                {"name": "more-data-helps", "statement": "a larger datastore lowers perplexity",
                 "trend": {"measure": "sweep", "variant": "small", "direction": "decreasing"}}],
        plots=[{"measure": "ppl"}, {"measure": "sweep"}, {"kind": "reliability"}])
    study, _ = load_study(str(path))
    reliability = {"calibration": {"reliability": {"confidence": [0.2, 0.0, 0.8], "accuracy": [0.25, 0.0, 0.7],
                                                   "count": [10, 0, 5]}}}
    runs = []
    for variant, ppl in (("small", [30.0, 32.0, 31.0]), ("large", [20.0, 21.0, 22.0])):
        for seed, value in enumerate(ppl):
            folder = tmp_path / f"{variant}{seed}"
            folder.mkdir()
            metrics = {"perplexity": value, "knnlm_sweep/50pct/perplexity": value - 1, "knnlm_sweep/100pct/perplexity": value - 3}
            (folder / "manifest.json").write_text(json.dumps({"metrics": metrics}))
            (folder / "report.json").write_text(json.dumps(reliability))
            runs.append(VariantRun(variant, seed, {"eval_pretrain": str(folder)}, "eval_pretrain", f"{variant}{seed}".ljust(32, "0"),
                                   ["eval_pretrain"] if seed == 0 else []))
    context = {"parent_run_id": "parent", "git_commit": "0123456789abcdef", "overrides": ["pretrain.steps=3"],
               "study_file": str(path), "seconds": 12.0, "finished_at": "2025-01-01T00:00:00+00:00"}
    outcome = conclude(study, runs, load_config("tiny", [f"workspace={tmp_path / 'ws'}"]), context)

    assert {v.claim: v.verdict for v in outcome["verdicts"]} == {"size-helps": HELD, "more-data-helps": HELD}
    report = outcome["report"]
    assert report == tmp_path / "ws" / "studies" / "fixture" / "report.md"
    text = report.read_text()
    assert "| size-helps | **HELD** | `ppl[large] - ppl[small] < 0` |" in text
    assert "> the larger model has the lower perplexity" in text
    # small: 30, 32, 31 -> mean 31, sd 1, t(0.975, 2) = 4.303: half-width 4.303 / sqrt(3) = 2.484
    assert "| small | 31 [28.52, 33.48] |" in text and "| large | 21 [18.52, 23.48] |" in text
    assert "| small | 30 [27.52, 32.48] | 28 [25.52, 30.48] |" in text, "the x list's columns: 50% and 100%"
    assert "2 stages computed and 4 cache hits" in text and "`pretrain.steps=3`" in text and "git 0123456789" in text
    assert ("Difference per independent replicate: -10, -11, -9; estimate -10, 95% interval [-12.48, -7.516] "
            "(t-interval over 3 independent replicates)." in text)
    assert "Slope -0.04 per unit of x" in text
    assert "| x=50 → x=100 | -2 | [-2, -2] | held |" in text
    assert "| small | pipeline up to eval_pretrain  | 3 | small000, small100, small200 |" in text
    names = ["01_ppl.png", "02_sweep.png", "03_reliability_tokens.png"]
    assert sorted(p.name for p in report.parent.glob("*.png")) == names
    assert all(f"![{Path(name).stem}]({name})" in text for name in names)
    results = json.loads((report.parent / "results.json").read_text())
    cells = {(c["variant"], c["measure"], c["x"]): c for c in results["cells"]}
    assert cells[("large", "sweep", 100.0)]["values"] == [17.0, 18.0, 19.0]
    assert [v["verdict"] for v in results["verdicts"]] == [HELD, HELD] and len(results["runs"]) == 6
    assert outcome["metrics"] == {"size-helps/held": 1.0, "size-helps/difference": -10.0, "more-data-helps/held": 1.0,
                                  "more-data-helps/slope": pytest.approx(-0.04)}


# ---------------------------------------------------------------- replicates, items, equivalence, trends


def _runs_of(tmp_path: Path, values: dict[str, list[float]], shared_after: int | None = None,
             items: dict[str, list[list[float]]] | None = None, model_stage: bool = False) -> list:
    """VariantRuns over manifests written here: values[variant][seed] is the test perplexity. Seeds from
    `shared_after` on reuse seed 0's artifact folders (the second seed's stages all cache hits). `items`:
    per variant, per-document negative log-likelihoods (one token each) written as the evaluation does.
    `model_stage`: each seed gets its own evaluation folder but all share one pretrain folder."""
    from jielong.tasks.lib.study.items import ITEMS_FILE
    from jielong.tasks.lib.study.verdict import VariantRun

    runs = []
    for variant, per_seed in values.items():
        for seed, value in enumerate(per_seed):
            reuse = shared_after is not None and seed >= shared_after
            if items:  # the manifest's metric is what its items give
                value = math.exp(sum(items[variant]) / len(items[variant]))
            folder = tmp_path / f"{variant}-eval{0 if reuse else seed}"
            model = tmp_path / f"{variant}-model{0 if (reuse or model_stage) else seed}"
            for path in (folder, model):
                path.mkdir(exist_ok=True)
                (path / "manifest.json").write_text(json.dumps({"metrics": {"perplexity": value}}))
            if items:
                nll = items[variant]
                documents = {"ids": [f"doc{i}" for i in range(len(nll))], "nll": nll, "tokens": [1.0] * len(nll)}
                (folder / ITEMS_FILE).write_text(json.dumps({"documents": {"test": documents}}))
            runs.append(VariantRun(variant, seed, {"pretrain": str(model), "eval_pretrain": str(folder)}, "eval_pretrain"))
    return runs


def _study(claims: list[dict], bootstrap: dict | None = None, variants=("a", "b")):
    from jielong.tasks.lib.study.spec import Study

    return Study.model_validate({
        "name": "t", "title": "t", "notes": "n", "experiment": "e", "limits": "l", "cost": "c",
        "variants": [{"name": v, "x": i + 1} for i, v in enumerate(variants)],
        "measures": {"ppl": {"metric": "eval:perplexity"}}, "claims": claims,
        **({"bootstrap": bootstrap} if bootstrap else {})})


COPY_CLAIMS = [
    {"name": "lower", "statement": "s", "compare": {"a": {"variant": "b", "measure": "ppl"}, "op": "<",
                                                      "b": {"variant": "a", "measure": "ppl"}}},
    {"name": "barely", "statement": "s", "equivalent": {"a": {"variant": "b", "measure": "ppl"},
                                                          "b": {"variant": "a", "measure": "ppl"}, "margin": 0.5}},
    {"name": "falls", "statement": "s", "trend": {"measure": "ppl", "variants": ["a", "b"], "direction": "decreasing"}},
]


def test_cache_hit_copies_are_one_replicate_and_leave_every_claim_inconclusive(tmp_path: Path):
    """Two seeds whose second is all cache hits: the same artifact twice is one computation, not two
    replicates, so no claim has an interval; the reason names the repeated artifact."""
    runs = _runs_of(tmp_path, {"a": [30.0, 30.0], "b": [20.0, 20.0]}, shared_after=1)
    verdicts = judge(_study(COPY_CLAIMS), Table(_study(COPY_CLAIMS), runs))
    assert [v.verdict for v in verdicts] == [INCONCLUSIVE] * 3
    for v in verdicts:
        assert "one independent value" in v.reason and "seed 1 repeats" in v.reason
        assert f"{tmp_path.name}/b-model0" in v.reason or f"{tmp_path.name}/a-model0" in v.reason
        assert str(tmp_path) not in v.reason  # named as stage/key, without the machine's folders
    # two seeds that are independent computations with the same spread are judged
    independent = _runs_of(tmp_path / "ind", {"a": [30.0, 30.5], "b": [20.0, 20.4]}) if (tmp_path / "ind").mkdir() is None else []
    assert judge(_study(COPY_CLAIMS[:1]), Table(_study(COPY_CLAIMS[:1]), independent))[0].verdict == HELD


def test_a_measure_the_seed_does_not_reach_counts_once(tmp_path: Path):
    """Each seed has its own evaluation artifact (its key holds the seed), but the model evaluated is the
    same one: a perplexity of that model is one value however many seeds re-read it."""
    runs = _runs_of(tmp_path, {"a": [30.0, 30.0, 30.0], "b": [20.0, 20.0, 20.0]}, model_stage=True)
    verdict = judge(_study(COPY_CLAIMS[:1]), Table(_study(COPY_CLAIMS[:1]), runs))[0]
    assert verdict.verdict == INCONCLUSIVE and "seed 1 repeats" in verdict.reason and "-model0" in verdict.reason


def test_item_level_resampling_gives_copies_an_interval(tmp_path: Path):
    """The same cache-hit fixture with the evaluation's per-document values: the interval comes from
    resampling the documents (paired between the arms) and has non-zero width; the report names the method."""
    import numpy as np

    rng = np.random.default_rng(0)
    base = rng.gamma(2.0, 1.5, 80)
    items = {"a": (base + 0.4).tolist(), "b": (base + rng.normal(0, 0.3, 80)).tolist()}
    runs = _runs_of(tmp_path, {"a": [0.0, 0.0], "b": [0.0, 0.0]}, shared_after=1, items=items)
    study = _study(COPY_CLAIMS, bootstrap={"resamples": 500, "seed": 7})
    table = Table(study, runs)
    lower, barely, falls = judge(study, table)
    est = lower.estimate
    assert est.low < est.high and est.replicates == 1
    assert "bootstrap, 500 resamples (seed 7) of 1 independent replicate" in est.method and "80 test-documents" in est.method
    # the point estimate is the perplexity recomputed from the items: exp(mean nll)
    assert est.mean == pytest.approx(np.exp(np.mean(items["b"])) - np.exp(np.mean(items["a"])))
    assert lower.verdict == HELD and "seed 1 repeats" in lower.reason
    assert falls.verdict == HELD and falls.estimate.low < falls.estimate.high
    # the same seed gives the same interval: a report can be reproduced
    again = judge(study, Table(study, runs))[0].estimate
    assert (again.low, again.high) == (est.low, est.high)
    # without item resampling the copies are back to one value and no interval
    off = _study(COPY_CLAIMS, bootstrap={"items": False})
    assert judge(off, Table(off, runs))[0].verdict == INCONCLUSIVE


def test_seeds_measured_on_the_same_items_do_not_average_the_items_variation_away(tmp_path: Path):
    """Two independent seeds with the same per-document values on the same documents: the documents'
    sampling variation is the same for both, so the interval is as wide as with one seed. Drawn anew for each
    seed (as if each had documents of its own) it would shrink by about sqrt(2)."""
    import numpy as np

    rng = np.random.default_rng(1)
    base = rng.gamma(2.0, 1.5, 80)
    items = {"a": (base + 0.4).tolist(), "b": (base + rng.normal(0, 0.3, 80)).tolist()}
    study = _study(COPY_CLAIMS[:1], bootstrap={"resamples": 2000, "seed": 3})
    widths = []
    for seeds in (1, 2):
        (tmp_path / str(seeds)).mkdir()
        runs = _runs_of(tmp_path / str(seeds), {"a": [0.0] * seeds, "b": [0.0] * seeds}, items=items)
        est = judge(study, Table(study, runs))[0].estimate
        assert est.replicates == seeds
        widths.append(est.high - est.low)
    assert widths[1] / widths[0] == pytest.approx(1.0, abs=0.1)
    assert "2 independent replicates and, crossed with them, the items (80 test-documents)" in est.method


@pytest.mark.parametrize("a, b, expected", [
    ([10.0, 10.1, 9.9], [10.3, 10.4, 10.2], NOT_HELD),  # b above a by 0.3, margin 0.2
    ([10.3, 10.4, 10.2], [10.0, 10.1, 9.9], NOT_HELD),  # the other sign
    ([10.0, 10.1, 9.9], [10.01, 10.09, 9.91], HELD),  # well inside
    ([10.0, 10.5, 9.6], [10.1, 10.0, 10.0], INCONCLUSIVE),  # too noisy to tell
])
def test_an_equivalence_claim_is_two_one_sided_tests(tmp_path: Path, a, b, expected):
    study = _study([{"name": "eq", "statement": "s", "equivalent": {"a": {"variant": "a", "measure": "ppl"},
                                                                     "b": {"variant": "b", "measure": "ppl"}, "margin": 0.2}}])
    verdict = judge(study, Table(study, _runs_of(tmp_path, {"a": a, "b": b})))[0]
    assert verdict.verdict == expected, verdict.reason
    assert verdict.estimate.level == 0.90 and "two one-sided tests" in verdict.rule
    if expected == INCONCLUSIVE:  # how many more samples the measured variance asks for
        assert "times the samples behind it (t-interval over 3 independent replicates)" in verdict.reason


def test_a_one_sided_margin_no_longer_passes_a_large_difference_of_the_other_sign(tmp_path: Path):
    """"random labels cost < 0.05" as a one-sided compare holds when random beats gold by 0.2; as an
    equivalence claim it does not."""
    gold, random = [0.60, 0.61, 0.59], [0.80, 0.81, 0.79]
    one_sided = _study([{"name": "c", "statement": "s", "compare": {"a": {"variant": "a", "measure": "ppl"}, "op": "<",
                                                                     "b": {"variant": "b", "measure": "ppl"}, "margin": 0.05}}])
    equivalent = _study([{"name": "c", "statement": "s", "equivalent": {"a": {"variant": "a", "measure": "ppl"},
                                                                         "b": {"variant": "b", "measure": "ppl"}, "margin": 0.05}}])
    runs = _runs_of(tmp_path, {"a": gold, "b": random})
    assert judge(one_sided, Table(one_sided, runs))[0].verdict == HELD
    assert judge(equivalent, Table(equivalent, runs))[0].verdict == NOT_HELD


def test_a_trend_is_its_slope_on_the_axis_the_study_names(tmp_path: Path):
    study = _study([{"name": "falls", "statement": "s", "trend": {"measure": "ppl", "variants": ["a", "b", "c"],
                                                                   "direction": "decreasing", "log_x": True}}],
                   variants=("a", "b", "c"))
    runs = _runs_of(tmp_path, {"a": [3.0, 3.1, 2.9], "b": [2.0, 2.2, 1.9], "c": [1.0, 1.1, 0.8]})
    verdict = judge(study, Table(study, runs))[0]
    # x = 1, 2, 3 on a log axis: the slope per unit of ln x, and its interval
    assert verdict.verdict == HELD and "ln x" in verdict.rule
    import numpy as np

    xs = np.log([1.0, 2.0, 3.0])
    slopes = [np.polyfit(xs, [3.0, 2.0, 1.0], 1)[0], np.polyfit(xs, [3.1, 2.2, 1.1], 1)[0], np.polyfit(xs, [2.9, 1.9, 0.8], 1)[0]]
    assert verdict.estimate.mean == pytest.approx(np.mean(slopes))


def test_preconditions_stop_the_study_and_are_never_verdicts(tmp_path: Path):
    from jielong.tasks.lib.study.spec import Study
    from jielong.tasks.lib.study.verdict import check_preconditions

    def with_budget(bound: float) -> Study:
        return Study.model_validate({
            "name": "t", "title": "t", "notes": "n", "experiment": "e", "limits": "l", "cost": "c",
            "variants": [{"name": "a"}, {"name": "b"}], "measures": {"ppl": {"metric": "eval:perplexity"}},
            "claims": COPY_CLAIMS[:1],
            "preconditions": [{"name": "spent", "statement": "the budget is spent", "a": {"variant": "a", "measure": "ppl"},
                               "op": ">", "margin": bound}]})

    runs = _runs_of(tmp_path, {"a": [30.0, 31.0], "b": [20.0, 20.4]})
    checked = check_preconditions(with_budget(29.0), Table(with_budget(29.0), runs))
    assert checked[0]["values"] == [30.0, 31.0]
    with pytest.raises(UserError, match="precondition 'spent' .* is violated \\(seed 0: 30\\)"):
        check_preconditions(with_budget(30.5), Table(with_budget(30.5), runs))


def test_every_verdict_of_a_results_file_follows_from_its_intervals(tmp_path: Path):
    """results.json states each claim's interval; recomputing each verdict from it gives the recorded
    verdict, and a verdict edited by hand is caught."""
    from jielong.flows.study import conclude
    from jielong.tasks.lib.study.verdict import recheck

    path = write_study(tmp_path, variants=[{"name": "a", "x": 1}, {"name": "b", "x": 2}], claims=COPY_CLAIMS,
                       bootstrap={"resamples": 200})
    study, _ = load_study(str(path))
    runs = _runs_of(tmp_path, {"a": [30.0, 31.0, 30.5], "b": [20.0, 20.4, 20.1]})
    context = {"parent_run_id": "p", "git_commit": "0" * 40, "overrides": [], "study_file": str(path), "seconds": 1.0,
               "finished_at": "2026-01-01T00:00:00+00:00"}
    outcome = conclude(study, runs, load_config("tiny", [f"workspace={tmp_path / 'ws'}"]), context)
    results = json.loads((outcome["report"].parent / "results.json").read_text())
    assert [v["verdict"] for v in results["verdicts"]] == [HELD, NOT_HELD, HELD]
    assert recheck(results) == []
    results["verdicts"][1]["verdict"] = HELD
    assert recheck(results) == ["barely: recorded 'held', its interval gives 'not held'"]


def test_a_cell_the_seed_does_not_reach_is_a_constant_against_one_it_does(tmp_path: Path):
    """b's model is the same at every seed (one value), a's differs: the seeds are replicates of a alone,
    and b enters each as its one value; the reason says which artifact repeats."""
    from jielong.tasks.lib.study.verdict import VariantRun

    runs = _runs_of(tmp_path, {"a": [30.0, 31.0, 30.5]})
    shared = tmp_path / "b-model"
    shared.mkdir()
    (shared / "manifest.json").write_text(json.dumps({"metrics": {"perplexity": 20.0}}))
    for seed in range(3):
        folder = tmp_path / f"b-eval{seed}"
        folder.mkdir()
        (folder / "manifest.json").write_text(json.dumps({"metrics": {"perplexity": 20.0}}))
        runs.append(VariantRun("b", seed, {"pretrain": str(shared), "eval_pretrain": str(folder)}, "eval_pretrain"))
    verdict = judge(_study(COPY_CLAIMS[:1]), Table(_study(COPY_CLAIMS[:1]), runs))[0]
    assert verdict.verdict == HELD and verdict.estimate.replicates == 3
    assert verdict.estimate.values == [-10.0, -11.0, -10.5] and f"from {shared.parent.name}/{shared.name}" in verdict.reason


def test_a_measure_read_for_some_variants_only(tmp_path: Path):
    """A metric only some variants' artifacts have (e.g. dedup:leaked_test_copies) is a measure with
    `variants:`; the others are not read, and a claim on them is a study mistake."""
    from jielong.tasks.lib.study.spec import Study

    base = {"name": "t", "title": "t", "notes": "n", "experiment": "e", "limits": "l", "cost": "c",
            "variants": [{"name": "a"}, {"name": "b"}],
            "measures": {"ppl": {"metric": "eval:perplexity"}, "only_b": {"metric": "eval:missing_in_a", "variants": ["b"]}},
            "claims": COPY_CLAIMS[:1]}
    runs = _runs_of(tmp_path, {"a": [30.0, 31.0], "b": [20.0, 20.4]})
    for run in runs:
        if run.variant == "b":
            path = Path(run.artifacts["eval_pretrain"]) / "manifest.json"
            path.write_text(json.dumps({"metrics": {"perplexity": 20.0, "missing_in_a": 3.0}}))
    study = Study.model_validate(base)
    table = Table(study, runs)
    assert ("b", "only_b", None) in table.cells and ("a", "only_b", None) not in table.cells
    bad = {**base, "claims": [{"name": "c", "statement": "s", "compare": {"a": {"variant": "a", "measure": "only_b"}, "op": ">", "margin": 0}}]}
    with pytest.raises(ValueError, match="read for \\['b'\\] only, not 'a'"):
        Study.model_validate(bad)


def test_an_instruct_measure_before_tuning_is_one_value_of_the_pretrained_model(tmp_path: Path):
    """heldout_*_before is measured on the pretrained model, which the tuning seeds do not change: every
    seed's instruct artifact repeats that one value."""
    from jielong.tasks.lib.study.spec import Study
    from jielong.tasks.lib.study.verdict import VariantRun

    pretrain = tmp_path / "pretrain"
    pretrain.mkdir()
    (pretrain / "manifest.json").write_text(json.dumps({"metrics": {}}))
    runs = []
    for seed, after in enumerate([0.30, 0.32, 0.31]):
        folder = tmp_path / f"instruct{seed}"
        folder.mkdir()
        (folder / "manifest.json").write_text(json.dumps({"metrics": {"choice_before": 0.27, "choice_after": after}}))
        runs.append(VariantRun("t", seed, {"pretrain": str(pretrain), "instruct": str(folder)}, "instruct"))
    study = Study.model_validate({
        "name": "t", "title": "t", "notes": "n", "experiment": "e", "limits": "l", "cost": "c",
        "variants": [{"name": "t", "stage": "instruct"}],
        "measures": {"before": {"metric": "instruct:choice_before"}, "after": {"metric": "instruct:choice_after"}},
        "claims": [{"name": "gain", "statement": "s", "compare": {"a": {"variant": "t", "measure": "after"}, "op": ">",
                                                                   "b": {"variant": "t", "measure": "before"}}}]})
    table = Table(study, runs)
    before, why = table.cell_estimate("t", "before")
    assert before.replicates == 1 and before.low is None and "seed 1 repeats before[t]" in why
    gain = judge(study, table)[0]  # the constant enters each seed's difference
    assert gain.verdict == HELD and gain.estimate.values == pytest.approx([0.03, 0.05, 0.04])
