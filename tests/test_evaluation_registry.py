"""The evaluation registry: each section is a function of its inputs, and the registry alone decides what
evaluate_model runs, reports, counts as metrics and renders in report.md."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import numpy as np

from evaluate_fixtures import eval_corpus, tiny_model  # noqa: F401  (pytest fixtures)
from jielong.tasks.lib import canaries
from jielong.tasks.lib.evaluation import EvaluateConfig, evaluation, icl, report
from jielong.tasks.lib.evaluation.model import load
from jielong.tasks.lib.evaluation.registry import EVALUATIONS, Evaluation, SectionResult


def _every_section_on() -> EvaluateConfig:
    return EvaluateConfig.model_validate({
        "perplexity": {"validation": True},
        "icl": {"shots": [0, 1], "num_seeds": 1, "max_examples": 4, "pack_tokens": 512},
        "knnlm": {"k": 4, "sweep": [0.5, 1.0], "max_train_tokens": 4000, "tune_max_tokens": 1000},
        "memorization": {"enabled": True, "prefix_tokens": 8, "continuation_tokens": 8},
    })


def _snapshot(inputs) -> dict:
    scores = {name: value.copy() for name, value in vars(inputs.test_scores).items() if isinstance(value, np.ndarray)}
    return {"splits": copy.deepcopy(inputs.splits), "test_docs": copy.deepcopy(inputs.test_docs),
            "prepared": copy.deepcopy(inputs.prepared), "scores": scores}


def test_every_section_leaves_its_inputs_untouched(tiny_model, eval_corpus, tmp_path):
    cfg = _every_section_on()
    splits = {name: evaluation.read_documents(paths) for name, paths in eval_corpus.items()}
    canary = max(splits["train"], key=lambda d: len(d["text"]))
    splits["train"] += canaries.copies(canary, 2)  # memorisation measures canaries found in the splits
    inputs = evaluation.inputs_of(load(tiny_model, "cpu", None), cfg, splits, 7, tmp_path,
                                  {"icl": icl.prepare(cfg, splits, 7)})
    before = _snapshot(inputs)
    for entry in EVALUATIONS:
        assert entry.enabled(cfg), entry.name
        result = entry.module().run(inputs)
        assert isinstance(result, SectionResult) and result.report and result.metrics, entry.name
        assert all(name.startswith("eval/") for name in result.metrics), entry.name
        after = _snapshot(inputs)
        assert after["splits"] == before["splits"] and after["test_docs"] == before["test_docs"], entry.name
        assert after["prepared"] == before["prepared"], entry.name
        assert all(np.array_equal(after["scores"][k], v) for k, v in before["scores"].items()), entry.name


@dataclass(frozen=True)
class _Stub(Evaluation):
    """A registered evaluation without a config section: always on, its `run` given directly."""

    section: Callable | None = None

    def enabled(self, evaluate) -> bool:
        return True

    def module(self):
        return SimpleNamespace(run=self.section)


def _stub_run(inputs) -> SectionResult:
    figure = inputs.out_dir / "stub.png"
    figure.write_bytes(b"png")
    confidence = float(inputs.test_scores.confidence.mean())
    return SectionResult({"mean_confidence": confidence}, {"eval/stub/mean_confidence": confidence}, [figure])


def _stub_markdown(part: dict) -> list[str]:
    return ["## Stub", "", f"Mean confidence {part['mean_confidence']:.3f}.", ""]


def test_a_registered_evaluation_reaches_report_metrics_plots_and_markdown(tiny_model, eval_corpus, tmp_path, monkeypatch):
    """One entry is all a new evaluation needs: evaluate_model and report.py are not told about it. An
    evaluation that has nothing to report (None) leaves no trace."""
    perplexity = next(e for e in EVALUATIONS if e.name == "perplexity")
    monkeypatch.setattr(evaluation, "EVALUATIONS", (
        perplexity, _Stub("stub", markdown=_stub_markdown, section=_stub_run), _Stub("silent", section=lambda inputs: None),
    ))
    cfg = EvaluateConfig.model_validate({"icl": {"enabled": False}, "knnlm": {"enabled": False}})
    result = evaluation.evaluate_model(tiny_model, eval_corpus, cfg, tmp_path, seed=None, device="cpu")

    rep = json.loads(result["report_json"].read_text())
    assert list(rep) == ["model_dir", "device", "max_length", "seed", "config", "perplexity", "stub", "timings",
                         "metrics", "plots"]
    assert list(rep["timings"]) == ["perplexity", "stub", "total"]
    names = list(result["metrics"])
    assert names[0] == "eval/parameters" and names[-2:] == ["eval/stub/mean_confidence", "eval/seconds"]
    assert "eval/perplexity" in names and "eval/ece" not in names  # calibration is not registered here
    assert rep["plots"] == ["stub.png"] and [p.name for p in result["plots"]] == ["stub.png"]
    markdown = result["report_md"].read_text()
    assert markdown.index("## Perplexity") < markdown.index("## Stub") and "## Calibration" not in markdown


def test_a_skipped_knnlm_renders_as_skipped():
    """An empty train split gives no datastore: the report says so instead of failing to render."""
    assert "Skipped: empty train split." in report.knnlm_markdown({"skipped": "empty train split"})


def test_answer_calibration_renders_with_any_number_of_bins():
    """report.md names the equal-mass bins the config asked for (evaluate.calibration.equal_mass_bins)."""
    from jielong.tasks.lib.evaluation.report import icl_markdown

    row = {"mode": "gold", "k": 0, "k_used": 0.0, "acc": 0.5, "acc_std": 0.0, "acc_norm": 0.5, "acc_norm_std": 0.0, "acc_bytes": 0.5,
           "macro_f1": 0.4, "ece_15_bin": 0.12}
    task = {"description": "d.", "n_examples": 2, "n_pool": 2, "chance": 0.5, "chance_note": "two labels",
            "table": [row], "answer_calibration": {"ece_15_bin": 0.12, "ece_10_bin_equal_width": 0.1}}
    text = "\n".join(icl_markdown({"tasks": {"t": task}, "skipped": {}}))
    assert "answer ECE (15 bins)" in text and "ECE (15 equal-mass bins) 0.12" in text


def test_in_context_tasks_all_skipped_link_no_missing_plot():
    """With every task skipped no answer reliability plot is drawn: report.md names why, links nothing."""
    text = "\n".join(report.icl_markdown({"tasks": {}, "skipped": {"api_name": "no examples"}}))
    assert "reliability_answers.png" not in text and "Skipped `api_name`: no examples." in text
