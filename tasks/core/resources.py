"""Where the files jielong ships beside its code live: configs/, studies/ and data/eval/.

In a checkout (an editable install) they are the repository's folders; `pip install .` copies them
into the package as jielong/configs, jielong/studies and jielong/eval_tasks (pyproject.toml), so an
installed jielong finds its presets, studies and task specs from any working directory.
"""

from __future__ import annotations

from pathlib import Path

# the folder holding tasks/: the checkout, or the installed jielong package
BASE = Path(__file__).resolve().parents[2]
SHIPPED = {"configs": ("configs",), "studies": ("studies",), "eval_tasks": ("data/eval", "eval_tasks")}


def shipped_dir(name: str) -> Path:
    """The folder of one shipped resource set (`configs`, `studies` or `eval_tasks`)."""
    candidates = [BASE / where for where in SHIPPED[name]]
    return next((path for path in candidates if path.is_dir()), candidates[0])
