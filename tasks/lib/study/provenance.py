"""Where a study's published numbers come from: the command, date, commit, machine, MLflow parent run and
wall time of the run that computed them, and the check that the README quotes them faithfully.

`jielong study NAME --publish` copies report.md, results.json and the plots into studies/results/NAME/
(committed with the code), refusing a working tree with uncommitted changes to tracked files unless
told to mark the report dirty.

A README quotes a study number as a link to its report whose title names the number:

    [0.96](studies/results/contamination/report.md "flattery[leaked]")           a cell's mean
    [0.91](studies/results/contamination/report.md "flattery[leaked] low")       its interval's ends (low, high)
    [-0.12](studies/results/contamination/report.md "claim leak-flatters")       a claim's estimate (low, high)
    [held](studies/results/contamination/report.md "verdict leak-flatters")      a claim's verdict

`quoted_numbers` finds them and `check_quote` compares each with its results.json.
"""

from __future__ import annotations

import math
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

from jielong.tasks.core.resources import BASE, shipped_dir
from jielong.tasks.core.schema import UserError

QUOTE = re.compile(r"\[(?P<text>[^\]]+)\]\((?P<path>studies/results/(?P<study>[A-Za-z0-9_.-]+)/report\.md) "
                   r"\"(?P<title>[^\"]+)\"\)")
CELL = re.compile(r"^(?P<measure>[A-Za-z0-9_]+)\[(?P<variant>[A-Za-z0-9_.-]+)(, x=(?P<x>[-0-9.e+]+))?\]( (?P<end>low|high))?$")
CLAIM = re.compile(r"^(?P<what>claim|verdict) (?P<claim>[A-Za-z0-9_.-]+)( (?P<end>low|high))?$")
# the compute-optimal fit (tasks/lib/study/isoflop.py): "isoflop exponent [low|high]" or, per budget,
# "isoflop C=1e12 optimum|tokens_per_parameter [low|high]"
ISOFLOP = re.compile(r"^isoflop (exponent|C=(?P<flops>[0-9.e+]+) (?P<quantity>optimum|tokens_per_parameter))"
                     r"( (?P<end>low|high))?$")


def results_dir(name: str) -> Path:
    return shipped_dir("studies") / "results" / name


# where --publish writes, as git status names it (studies/results/ in a checkout)
PUBLISHED = results_dir("").relative_to(BASE).as_posix() + "/"


def shown_path(path: Path | str) -> str:
    """A study file as reports show it: relative to the checkout (studies/NAME.yaml) when inside it, else
    whole: a published report does not carry the machine's folders."""
    path = Path(path).resolve()
    return str(path.relative_to(BASE)) if path.is_relative_to(BASE) else str(path)


def _git(*args: str) -> str:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=BASE)
    except (OSError, subprocess.SubprocessError):
        return ""
    # rstrip only: porcelain lines start with a status column that may be a space
    return done.stdout.rstrip() if done.returncode == 0 else ""


def tree_state(allow_dirty: bool) -> str:
    """'clean' or 'dirty' for the checkout the code runs from; a dirty tree is refused unless allowed."""
    if not _git("rev-parse", "HEAD"):
        raise UserError(f"study --publish: {BASE} is not a git checkout, so the published numbers could name no commit")
    # published results are outputs, not code: a study published earlier in the same sitting does not dirty the tree
    changed = [line[3:] for line in _git("status", "--porcelain", "--untracked-files=no").splitlines()
               if not line[3:].startswith(PUBLISHED)]
    if changed and not allow_dirty:
        files = ", ".join(changed[:5])
        raise UserError(f"study --publish: the working tree has uncommitted changes ({files}); commit them first, "
                        "or add --allow-dirty to publish a report marked dirty")
    return "dirty" if changed else "clean"


def machine() -> str:
    """The CPU (and GPU) the numbers were computed on, in a few words."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    words = f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}, Python {platform.python_version()}"
    try:
        import torch

        if torch.cuda.is_available():
            words += f", GPU {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return words


def header_lines(context: dict) -> list[str]:
    commit = context["git_commit"] + (" (working tree dirty: uncommitted changes to tracked files)"
                                      if context.get("tree") == "dirty" else "")
    return ["| provenance | |", "|---|---|",
            f"| command | `{context.get('command') or '(called from Python)'}` |",
            f"| date (UTC) | {context['finished_at']} |",
            f"| commit | `{commit}` |",
            f"| machine | {context.get('machine') or machine()} |",
            f"| MLflow parent run | `{context['parent_run_id']}` |",
            f"| wall time | {context['seconds']:.0f} s |", ""]


def publish(out_dir: Path, name: str) -> Path:
    """Copy a study's report.md, results.json and plots into studies/results/NAME/ (replaced whole)."""
    target = results_dir(name)
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for path in sorted(out_dir.iterdir()):
        if path.is_file() and path.suffix in (".md", ".json", ".png"):
            shutil.copy2(path, target / path.name)
    return target


# ---------------------------------------------------------------- quotes in the README


def quoted_numbers(text: str) -> list[dict]:
    return [m.groupdict() for m in QUOTE.finditer(text)]


def _close(text: str, value: float) -> bool:
    """Whether `text` (a number as written: 0.96, 1,234, -20%) is `value` rounded as shown."""
    written = text.strip().replace(",", "").replace("−", "-")
    scale = 100.0 if written.endswith("%") else 1.0
    written = written.rstrip("%")
    decimals = len(written.split(".")[1]) if "." in written else 0
    return abs(float(written) - value * scale) <= 0.5 * 10 ** -decimals + 1e-12


def _isoflop_value(fit: re.Match, isoflop: dict) -> tuple[float | None, str]:
    """The quoted figure of the compute-optimal fit, or why there is none."""
    if not isoflop:
        return None, "results.json has no compute-optimal fit"
    if fit["flops"] is None:
        interval = isoflop["bootstrap"]["exponent"]
        return (interval[fit["end"]] if fit["end"] else isoflop["size_exponent"]), ""
    budgets = [b for b in isoflop["budgets"] if math.isclose(b["flops"], float(fit["flops"]), rel_tol=1e-9)]
    if not budgets:
        return None, f"no budget C={fit['flops']} in results.json"
    budget, quantity = budgets[0], fit["quantity"]
    return (budget["interval"][quantity][fit["end"]] if fit["end"] else budget[quantity]), ""


def check_quote(quote: dict, results: dict) -> str:
    """'' when the quote agrees with results.json, else what disagrees."""
    title, text = quote["title"], quote["text"]
    if cell := CELL.match(title):
        x = float(cell["x"]) if cell["x"] else None
        rows = [r for r in results["cells"] if r["variant"] == cell["variant"] and r["measure"] == cell["measure"]
                and (r["x"] is None if x is None else r["x"] is not None and float(r["x"]) == x)]
        if not rows:
            return f"{quote['study']}: no cell {title!r} in results.json"
        value = rows[0]["ci_" + cell["end"] if cell["end"] else "mean"]
    elif claim := CLAIM.match(title):
        found = [v for v in results["verdicts"] if v["claim"] == claim["claim"]]
        if not found:
            return f"{quote['study']}: no claim {claim['claim']!r} in results.json"
        if claim["what"] == "verdict":
            return "" if text.strip().lower() == found[0]["verdict"] else \
                f"{quote['study']}: {claim['claim']} is quoted {text!r}, results.json says {found[0]['verdict']!r}"
        value = (found[0].get("estimate") or {}).get(claim["end"] or "mean")
    elif fit := ISOFLOP.match(title):
        value, problem = _isoflop_value(fit, results.get("isoflop") or {})
        if problem:
            return f"{quote['study']}: {problem}"
    else:
        return f"{quote['study']}: cannot read the quoted quantity {title!r}"
    if value is None:
        return f"{quote['study']}: {title!r} has no value in results.json"
    try:
        agrees = _close(text, float(value))
    except ValueError:
        return f"{quote['study']}: {text!r} is not a number"
    return "" if agrees else f"{quote['study']}: {title} is quoted {text}, results.json says {float(value):.6g}"
