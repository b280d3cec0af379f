"""`jielong study NAME`: a claim of the course notes as one Prefect flow.

The study flow plans every variant x seed as a config (the study's base config, its overrides, the
variant's, the command line's, then the seed keys offset by the seed), runs each as a subflow of the
pipeline (or of `jielong eval` for a model variant) that reuses every cached stage, under one MLflow
parent run `study-<name>`, then reads the metrics, computes the verdicts (tasks/lib/study/verdict.py) and
writes report.md, results.json and the plots into <workspace>/studies/<name>/ and the parent run.

Variants run one after another: on 2 cores two trainings at once only share the cores, and the stage
locks already make two studies (or a study and a `jielong run`) sharing a workspace safe.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow
from prefect.states import State

from jielong.flows.outcome import RunOutcome, flow_return, outcome_of
from jielong.flows.stages import STAGE_NAMES, STAGES, Selection, upstream_of
from jielong.tasks.config import PipelineConfig, UserError, load_config
from jielong.tasks.lib.study.spec import REFERENCE, Study, Variant, load_study, study_files
from jielong.tasks.lib.study.verdict import HELD, NOT_HELD, Table, VariantRun, check_preconditions, judge
from jielong.tasks.core.run_labels import KIND_TAG, error_text
from jielong.tasks.core.tracking import git_commit, tracking_uri

VERDICT_SCORE = {HELD: 1.0, NOT_HELD: 0.0}  # inconclusive: no metric, a tag only


@dataclass
class PlannedRun:
    variant: Variant
    seed: int
    config: str
    overrides: list[str]
    cfg: PipelineConfig

    @property
    def run_name(self) -> str:
        return f"{self.variant.name} seed {self.seed}"


def _setting(cfg: PipelineConfig, key: str) -> int:
    value: object = cfg
    for part in key.split("."):
        if not hasattr(value, part):
            raise UserError(f"seed_keys: {key!r} is not a setting of the config")
        value = getattr(value, part)
    if not isinstance(value, int) or isinstance(value, bool):
        raise UserError(f"seed_keys: {key!r} is {value!r}, not an integer setting")
    return value


def _load(config: str, overrides: list[str], where: str) -> PipelineConfig:
    try:
        return load_config(config, overrides)
    except UserError as err:
        raise UserError(f"{where}: {err}") from None


def plan_study(study: Study, seeds: int, overrides: list[str]) -> tuple[PipelineConfig, list[PlannedRun]]:
    """The study's own config (workspace, MLflow store and experiment) and every variant x seed, validated
    before anything runs."""
    _check_readable(study)
    base = _load(study.config, [*study.set, *overrides], f"study {study.name}")
    shared = [f"mlflow.experiment={json.dumps(base.mlflow.experiment)}"]  # every run nests under the study's parent run
    runs = []
    for variant in study.variants:
        config = variant.config or study.config
        settings = [*study.set, *variant.set, *overrides, *shared]
        first = _load(config, settings, f"study {study.name}, variant {variant.name}")
        if first.workspace_path() != base.workspace_path() or tracking_uri(first) != tracking_uri(base):
            raise UserError(f"study {study.name}, variant {variant.name}: its workspace and MLflow store must be the "
                            f"study's ({base.workspace_path()}, {tracking_uri(base)})")
        if not variant.model and variant.eval_stage not in STAGE_NAMES:
            raise UserError(f"study {study.name}, variant {variant.name}: stage {variant.eval_stage!r} is not one of "
                            f"{', '.join(STAGE_NAMES)}")
        starts = {key: _setting(first, key) for key in study.seed_keys}
        for seed in range(seeds):
            seeded = [*settings, *(f"{key}={start + seed}" for key, start in starts.items())]
            cfg = _load(config, seeded, f"study {study.name}, variant {variant.name}")
            runs.append(PlannedRun(variant, seed, config, seeded, cfg))
    return base, runs


def _stage_names(variant: Variant) -> set[str]:
    if variant.model:
        return {*STAGE_NAMES[:3], variant.eval_stage}
    return upstream_of([variant.eval_stage], STAGES) | {variant.eval_stage}


def _check_readable(study: Study) -> None:
    """Every metric read for a variant comes from a stage the variant runs: a measure an outside model
    cannot have (its training length, say) is found here, not after every variant has run."""
    for variant in study.variants:
        reads = [(f"measure {name!r}", ref) for name, measure in study.measures.items()
                 if variant.name in study.measured(name) for x in (measure.x or [None]) for ref in measure.references(x)]
        if isinstance(variant.x, str):
            reads.append(("its x", variant.x))
        runs = _stage_names(variant)
        for what, reference in reads:
            stage = REFERENCE.match(reference)["stage"]  # type: ignore[index]
            stage = variant.eval_stage if stage == "eval" else stage
            if stage not in runs:
                raise UserError(f"study {study.name}, variant {variant.name}: {what} reads {reference!r}, but the "
                                f"variant runs no {stage!r} stage (its stages: {', '.join(sorted(runs))}); list the "
                                f"variants the measure is read for under its `variants:`")


def _stages_of(cfg: PipelineConfig, variant: Variant) -> tuple[list, Selection]:
    if variant.model:
        from jielong.models.generate import resolve_model
        from jielong.tasks.evaluate import external_stage

        try:
            model_dir = resolve_model(variant.model, tracking_uri(cfg), store=cfg.workspace_path())
        except ValueError as err:
            raise UserError(f"variant {variant.name}: {err}") from None
        stages = [*STAGES[:3], external_stage(model_dir)]
        return stages, Selection(run=[s.name for s in stages])
    wanted = upstream_of([variant.eval_stage], STAGES) | {variant.eval_stage}
    return STAGES, Selection(run=[name for name in STAGE_NAMES if name in wanted])


@flow(name="jielong-study-variant")
def variant_flow(study: str, variant: dict, seed: int, config: str, overrides: list[str],
                 parent_run_id: str) -> RunOutcome | State:
    """One variant at one seed: the pipeline up to its evaluation (cached stages reused), as a child run.
    Its models stay in the workspace: a study neither serves nor registers one version per variant."""
    from jielong.flows.pipeline import run_stages

    chosen = Variant.model_validate(variant)
    cfg = load_config(config, overrides)
    stages, selection = _stages_of(cfg, chosen)
    tags = {"jielong.study": study, "jielong.variant": chosen.name, "jielong.seed": str(seed), KIND_TAG: "study_variant"}
    return flow_return(run_stages(cfg, stages, selection, f"{study}/{chosen.name}/seed{seed}", parent_run_id, tags,
                                  log_models=False, overrides=overrides))


@flow(name="jielong-study")
def study_flow(study: str, seeds: int | None = None, overrides: list[str] | None = None, publish: bool = False,
               tree: str = "", command: str = "") -> dict:
    """`publish`: also copy the report into studies/results/NAME/ (`tree`: the checkout's state, checked
    before the run by run_study)."""
    from prefect.runtime import flow_run

    from jielong.tasks.lib.study import provenance

    from jielong.flows.task_runners import make_task_runner
    from jielong.tasks.core.tracking import Tracker

    started = time.perf_counter()
    commit = git_commit()  # the code that runs: a commit made while the study runs is not it
    spec, path = load_study(study)
    overrides = overrides or []
    base, planned = plan_study(spec, seeds or spec.seeds, overrides)
    tracker = Tracker(base)
    parent = tracker.start_run(f"study-{spec.name}", {
        "jielong.study": spec.name, "jielong.git_commit": commit, "prefect.flow_run_id": str(flow_run.id or ""),
        KIND_TAG: "study"})
    try:
        tracker.log_params(parent, {"study": spec.name, "study_file": provenance.shown_path(path), "seeds": str(seeds or spec.seeds),
                                    "seed_keys": ",".join(spec.seed_keys), "config": spec.config,
                                    "variants": ",".join(v.name for v in spec.variants),
                                    "overrides": " ".join([*spec.set, *overrides])[:6000]})
        runs = []
        for run in planned:
            state = variant_flow.with_options(flow_run_name=f"{spec.name}/{run.run_name}",
                                              task_runner=make_task_runner(run.cfg))(
                study=spec.name, variant=run.variant.model_dump(mode="json"), seed=run.seed, config=run.config,
                overrides=run.overrides, parent_run_id=parent, return_state=True)
            summaries = outcome_of(state).result()
            runs.append(VariantRun(run.variant.name, run.seed, {s["stage"]: s["path"] for s in summaries},
                                   run.variant.eval_stage, summaries[0]["parent_run_id"] if summaries else "",
                                   [s["stage"] for s in summaries if s["status"] != "cached"], run.variant.model or ""))
        outcome = conclude(spec, runs, base, {
            "parent_run_id": parent, "git_commit": commit, "overrides": overrides, "study_file": provenance.shown_path(path),
            "seconds": time.perf_counter() - started, "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": command, "machine": provenance.machine(), "tree": tree})
        if publish:
            outcome["published"] = provenance.publish(outcome["report"].parent, spec.name)
        tracker.log_artifacts(parent, outcome["files"])
        tracker.log_metrics(parent, outcome["metrics"])
        tracker.set_tags(parent, {f"jielong.verdict.{v.claim}": v.verdict for v in outcome["verdicts"]})
    except BaseException as err:
        tracker.mark_failed(parent, error_text(err))
        tracker.close()
        raise
    tracker.end_run(parent)
    error = tracker.close()
    if error is not None:
        raise error
    outcome["parent_run_id"] = parent
    outcome["runs"] = runs
    return outcome


def conclude(spec: Study, runs: list[VariantRun], base: PipelineConfig, context: dict) -> dict:
    """Numbers, verdicts, plots and the report, written into <workspace>/studies/<name>/ (replaced whole)."""
    from jielong.tasks.lib.study.report import draw_plots, write_report

    table = Table(spec, runs)
    context = {**context, "preconditions": check_preconditions(spec, table)}
    verdicts = judge(spec, table)
    out_dir = base.workspace_path() / "studies" / spec.name
    staging = out_dir.with_name(f".{spec.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    plots = draw_plots(spec, table, staging)
    sections, results, metrics = [], {}, {}
    if spec.isoflop:
        from jielong.tasks.lib.study import isoflop

        plot, sections, results, metrics = isoflop.analyse(spec, table, staging)
        plots.append(plot)
    write_report(spec, table, verdicts, plots, staging, context, sections, results)
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    files = [out_dir / "report.md", out_dir / "results.json", *(out_dir / p.name for p in plots)]
    for v in verdicts:
        if v.verdict in VERDICT_SCORE:
            metrics[f"{v.claim}/held"] = VERDICT_SCORE[v.verdict]
        if v.estimate is not None:
            metrics[f"{v.claim}/{'slope' if v.kind == 'trend' else 'difference'}"] = v.estimate.mean
    return {"verdicts": verdicts, "files": files, "metrics": metrics, "report": out_dir / "report.md", "table": table}


def run_study(study: str, seeds: int | None = None, overrides: list[str] | None = None, publish: bool = False,
              allow_dirty: bool = False, command: str = "") -> dict:
    """Validate first (a mistake in the study or a variant's config, or a dirty tree to publish from, is
    reported before any server starts)."""
    from jielong.flows import prefect_api
    from jielong.tasks import ingest
    from jielong.tasks.core.tracking import check_tracking
    from jielong.tasks.lib.study.provenance import tree_state

    tree = tree_state(allow_dirty) if publish else ""

    spec, _ = load_study(study)
    base, planned = plan_study(spec, seeds or spec.seeds, overrides or [])
    for run in planned:
        ingest.check_sources(run.cfg)
    check_tracking(base)
    with prefect_api.connected():
        return study_flow(study=study, seeds=seeds, overrides=overrides or [], publish=publish, tree=tree, command=command)


def list_studies() -> list[dict]:
    rows = []
    for name, path in sorted(study_files().items()):
        try:
            spec, _ = load_study(str(path))
        except UserError as err:
            rows.append({"name": name, "title": f"(invalid: {err})", "runs": "", "claims": "", "cost": "", "file": str(path)})
            continue
        rows.append({"name": spec.name, "title": spec.title, "runs": f"{len(spec.variants)} x {spec.seeds} seeds",
                     "claims": str(len(spec.claims)), "cost": spec.cost.strip(), "file": str(Path(path))})
    return rows
