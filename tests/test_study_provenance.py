"""Published studies: the provenance header, --publish on a dirty tree, the committed results under
studies/results/ (each verdict recomputed from its intervals, its commit in this history), and the
README's study numbers checked against them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from jielong.tasks.config import UserError, load_config
from jielong.tasks.core.resources import BASE, shipped_dir
from jielong.tasks.lib.study import provenance
from jielong.tasks.lib.study.spec import load_study
from jielong.tasks.lib.study.verdict import recheck

RESULTS = sorted((shipped_dir("studies") / "results").glob("*/results.json"))


def _fake_git(monkeypatch, head: str, status: str) -> None:
    answers = {"rev-parse": head, "status": status}
    monkeypatch.setattr(provenance, "_git", lambda *args: answers[args[0]])


def test_a_dirty_tree_is_refused_or_marked(monkeypatch):
    _fake_git(monkeypatch, "abc123", " M tasks/lib/study/verdict.py")
    with pytest.raises(UserError, match="uncommitted changes \\(tasks/lib/study/verdict.py\\).*--allow-dirty"):
        provenance.tree_state(allow_dirty=False)
    assert provenance.tree_state(allow_dirty=True) == "dirty"
    _fake_git(monkeypatch, "abc123", "")
    assert provenance.tree_state(allow_dirty=False) == "clean"
    _fake_git(monkeypatch, "abc123", " M studies/results/contamination/report.md")
    assert provenance.tree_state(allow_dirty=False) == "clean", "a report published before this run is output, not code"
    _fake_git(monkeypatch, "", "")
    with pytest.raises(UserError, match="not a git checkout"):
        provenance.tree_state(allow_dirty=True)


def test_the_refusal_names_each_changed_file_whole_in_a_real_checkout(monkeypatch, tmp_path: Path):
    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    for name in ("studies.txt", "other.txt"):
        (tmp_path / name).write_text("a\n")
    git("add", ".")
    git("commit", "-q", "-m", "first")
    for name in ("studies.txt", "other.txt"):
        (tmp_path / name).write_text("b\n")
    monkeypatch.setattr(provenance, "BASE", tmp_path)
    with pytest.raises(UserError, match=r"uncommitted changes \(other.txt, studies.txt\)"):
        provenance.tree_state(allow_dirty=False)


def test_publish_on_a_dirty_tree_is_one_message_before_anything_runs(monkeypatch, tmp_path: Path):
    from jielong.flows.cli import app

    _fake_git(monkeypatch, "abc123", " M README.md")
    result = CliRunner().invoke(app, ["study", "contamination", "--publish", "--set", f"workspace={tmp_path}"])
    # main() prints a UserError as one line (flows/cli.py)
    assert isinstance(result.exception, UserError) and "uncommitted changes (README.md)" in str(result.exception)
    assert not (tmp_path / "studies").exists()


def test_the_report_header_names_command_date_commit_machine_run_and_wall_time(tmp_path: Path, monkeypatch):
    from jielong.flows.study import conclude
    from test_study import _runs_of, write_study

    path = write_study(tmp_path, variants=[{"name": "a", "x": 1}, {"name": "b", "x": 2}], bootstrap={"resamples": 200},
                       claims=[{"name": "lower", "statement": "s", "compare": {
                           "a": {"variant": "b", "measure": "ppl"}, "op": "<", "b": {"variant": "a", "measure": "ppl"}}}])
    study, _ = load_study(str(path))
    runs = _runs_of(tmp_path, {"a": [30.0, 31.0], "b": [20.0, 20.4]})
    context = {"parent_run_id": "0f" * 16, "git_commit": "1234567890" * 4, "overrides": [], "study_file": str(path),
               "seconds": 61.4, "finished_at": "2026-12-05T08:00:00+00:00", "command": "jielong study fixture --publish",
               "machine": "a test CPU, 2 logical CPUs", "tree": "dirty"}
    outcome = conclude(study, runs, load_config("tiny", [f"workspace={tmp_path / 'ws'}"]), context)
    text = outcome["report"].read_text()
    for line in ("| command | `jielong study fixture --publish` |", "| date (UTC) | 2026-12-05T08:00:00+00:00 |",
                 f"| commit | `{'1234567890' * 4} (working tree dirty: uncommitted changes to tracked files)` |",
                 "| machine | a test CPU, 2 logical CPUs |", f"| MLflow parent run | `{'0f' * 16}` |", "| wall time | 61 s |"):
        assert line in text, line
    monkeypatch.setattr(provenance, "results_dir", lambda name: tmp_path / "published" / name)
    target = provenance.publish(outcome["report"].parent, "fixture")
    assert sorted(p.name for p in target.iterdir()) == ["01_ppl.png", "report.md", "results.json"]
    assert json.loads((target / "results.json").read_text())["context"]["tree"] == "dirty"


RESULTS_FIXTURE = {
    "cells": [{"variant": "leaked", "measure": "flattery", "x": None, "mean": 0.9613, "ci_low": 0.95, "ci_high": 0.972},
              {"variant": "on", "measure": "loss", "x": 16.0, "mean": 5.081, "ci_low": 5.0, "ci_high": 5.2}],
    "verdicts": [{"claim": "leak-flatters", "verdict": "held", "estimate": {"mean": -0.1234, "low": -0.2, "high": -0.05}}],
    "isoflop": {"size_exponent": 0.4567,
                "bootstrap": {"exponent": {"low": 0.21, "high": 0.83, "without": 0.0}},
                "budgets": [{"flops": 1e12, "optimum": 61234.0, "tokens_per_parameter": 44.4,
                             "interval": {"optimum": {"low": 50000.0, "high": 70000.0, "without": 0.1},
                                          "tokens_per_parameter": {"low": 34.0, "high": 66.6, "without": 0.1}}}]},
}


@pytest.mark.parametrize("quote, problem", [
    ('[0.96](studies/results/c/report.md "flattery[leaked]")', ""),
    ('[0.9613](studies/results/c/report.md "flattery[leaked]")', ""),
    ('[0.97](studies/results/c/report.md "flattery[leaked]")', "quoted 0.97, results.json says 0.9613"),
    ('[0.972](studies/results/c/report.md "flattery[leaked] high")', ""),
    ('[5.08](studies/results/c/report.md "loss[on, x=16]")', ""),
    ('[-12%](studies/results/c/report.md "claim leak-flatters")', ""),
    ('[-0.13](studies/results/c/report.md "claim leak-flatters")', "quoted -0.13"),
    ('[held](studies/results/c/report.md "verdict leak-flatters")', ""),
    ('[not held](studies/results/c/report.md "verdict leak-flatters")', "results.json says 'held'"),
    ('[1.0](studies/results/c/report.md "nothing[here]")', "no cell"),
    ('[0.46](studies/results/c/report.md "isoflop exponent")', ""),
    ('[0.21](studies/results/c/report.md "isoflop exponent low")', ""),
    ('[0.45](studies/results/c/report.md "isoflop exponent")', "quoted 0.45, results.json says 0.4567"),
    ('[61,234](studies/results/c/report.md "isoflop C=1e12 optimum")', ""),
    ('[66.6](studies/results/c/report.md "isoflop C=1e12 tokens_per_parameter high")', ""),
    ('[44](studies/results/c/report.md "isoflop C=1e12 tokens_per_parameter")', ""),
    ('[44](studies/results/c/report.md "isoflop C=2e12 tokens_per_parameter")', "no budget C=2e12"),
])
def test_a_quoted_study_number_is_checked_against_its_results(quote, problem):
    (found,) = provenance.quoted_numbers(f"text {quote} more text")
    message = provenance.check_quote(found, RESULTS_FIXTURE)
    assert (problem in message and message) if problem else message == ""


def test_every_study_number_the_readme_quotes_agrees_with_its_results_json():
    readme = (BASE / "README.md").read_text(encoding="utf-8")
    problems = []
    for quote in provenance.quoted_numbers(readme):
        path = BASE / quote["path"].replace("report.md", "results.json")
        if not path.is_file():
            problems.append(f"{quote['study']}: the README quotes {quote['text']!r} but {path} is not committed")
            continue
        problems.append(provenance.check_quote(quote, json.loads(path.read_text(encoding="utf-8"))))
    assert not [p for p in problems if p], "\n".join(p for p in problems if p)


@pytest.mark.parametrize("path", RESULTS, ids=[p.parent.name for p in RESULTS])
def test_each_published_verdict_follows_from_its_table_and_its_commit_is_in_this_history(path: Path):
    results = json.loads(path.read_text(encoding="utf-8"))
    assert recheck(results) == []
    assert results["context"].get("tree") == "clean", "a published study is computed from a committed tree"
    commit = results["context"]["git_commit"]
    inside = subprocess.run(["git", "merge-base", "--is-ancestor", commit, "HEAD"], cwd=BASE, capture_output=True)
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=BASE, capture_output=True).returncode == 0:
        assert inside.returncode == 0, f"{path.parent.name}: its commit {commit} is not an ancestor of HEAD"
