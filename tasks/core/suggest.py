"""Suggestions for a misspelt name: the closest known ones (difflib), as the config's unknown keys get."""

from __future__ import annotations

import difflib
from typing import Iterable


def closest(name: str, known: Iterable[str], n: int = 3) -> list[str]:
    return difflib.get_close_matches(name, list(known), n=n, cutoff=0.6)


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """' Did you mean: a, b?' or '' when nothing is close."""
    close = closest(name, known)
    return f" Did you mean: {', '.join(close)}?" if close else ""
