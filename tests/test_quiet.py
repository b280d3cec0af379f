"""Quiet output (flows/quiet.py): the libraries' progress bars and bookkeeping lines are off by default and
back with --verbose / JIELONG_VERBOSE=1. Checked in fresh processes, as a command starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from evaluate_fixtures import eval_corpus, tiny_model  # noqa: F401  (pytest fixtures)

ROOT = Path(__file__).resolve().parent.parent

# what a stage does with transformers: load a model, save it
SCRIPT = """
import sys
from jielong.flows import quiet
quiet.configure(verbose="--verbose" in sys.argv)
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
model.save_pretrained(sys.argv[2])
"""


def run_script(model_dir: Path, out: Path, *flags: str, env: dict | None = None) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("JIELONG_VERBOSE", "HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE",
                                                             "TRANSFORMERS_VERBOSITY", "PYTHONWARNINGS")}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(model_dir), str(out), *flags], capture_output=True, text=True,
                          env={**clean, **(env or {})}, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout + done.stderr


def test_progress_bars_off_by_default_and_on_with_verbose(tiny_model, tmp_path):
    assert run_script(tiny_model, tmp_path / "a") == ""
    verbose = run_script(tiny_model, tmp_path / "b", "--verbose")
    assert "Loading weights" in verbose  # the bar the default hides
    assert "Loading weights" in run_script(tiny_model, tmp_path / "c", env={"JIELONG_VERBOSE": "1"})
