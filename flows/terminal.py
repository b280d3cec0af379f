"""What `jielong generate` and `jielong chat` print: the model's words on stdout exactly as it produced them
(never through rich, which wraps at the console's width), everything else on stderr, and a status line
there while a model loads or generates, only when stderr is a terminal (a log or a pipe gets none)."""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

HISTORY_LINES = 1000


def write_text(text: str) -> None:
    """The text as it is; a final newline only for a terminal (so the shell prompt starts on its own line)."""
    sys.stdout.write(text)
    if sys.stdout.isatty() and not text.endswith("\n"):
        sys.stdout.write("\n")
    sys.stdout.flush()


def notice(text: str) -> None:
    """A line for the person at the terminal, not part of the output (stderr)."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


@contextmanager
def status(what: str) -> Iterator[None]:
    """`what… 12 s` on stderr, updated each second and erased at the end, when stderr is a terminal."""
    if not sys.stderr.isatty():
        yield
        return
    done = threading.Event()
    started = time.monotonic()

    def show() -> None:
        while True:
            sys.stderr.write(f"\r\033[K{what}… {time.monotonic() - started:.0f} s")
            sys.stderr.flush()
            if done.wait(1.0):
                break
        sys.stderr.write("\r\033[K")
        sys.stderr.flush()

    thread = threading.Thread(target=show, name="jielong-status", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def quiet_loading() -> None:
    """transformers' own "Loading weights" progress bars: the status line says it, and only on a terminal."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    os.environ.setdefault("TQDM_DISABLE", "1")


def line_editing(history: Path) -> None:
    """Arrow keys, Ctrl-A/E, ... on what `input()` reads (readline), and its history kept in `history`
    (Up recalls earlier lines, of this session and of earlier ones)."""
    try:
        import readline
    except ImportError:  # Python built without readline: plain input
        return
    import atexit

    readline.set_history_length(HISTORY_LINES)
    try:
        readline.read_history_file(history)
    except OSError:
        pass  # none yet

    def save() -> None:
        try:
            history.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(history)
        except OSError:
            pass  # a read-only workspace: the history of this session is lost, nothing else

    atexit.register(save)
