"""What a command prints: by default jielong's own lines only (the stage lines, the summary table, where
the results are). The libraries' progress bars (transformers' "Loading weights" and "Writing model
shards", datasets' "Generating split", lm-eval's per-task bars) and log lines that tell the user nothing
they can act on are off; `--verbose` (or JIELONG_VERBOSE=1) leaves every library as it is.

Settings are environment variables, set before any library is imported, so the processes Prefect's task
runners start inherit them; a variable the user set already is left alone.
"""

from __future__ import annotations

import logging
import os
import warnings

QUIET_ENV = {
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # "Creating initial MLflow database tables..."
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # huggingface_hub's and transformers' bars (loading, saving weights)
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",  # datasets' bars (lm-eval task data)
    "TQDM_DISABLE": "1",  # bars of libraries that call tqdm with its defaults (lm-eval); jielong's own pass `disable`
    "TRANSFORMERS_VERBOSITY": "error",
    "DATASETS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    # the Python warnings libraries raise about their own internals (deprecations, future defaults)
    "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning,ignore::UserWarning",
}
# loggers whose INFO lines are bookkeeping (MLflow creating its tables, alembic migrations)
QUIET_LOGGERS = ("mlflow", "alembic", "lm_eval", "datasets", "transformers", "httpx")


def verbose_requested(flag: bool = False) -> bool:
    return flag or os.environ.get("JIELONG_VERBOSE", "") not in ("", "0", "false")


def configure(verbose: bool = False) -> None:
    """Quiet the libraries unless `verbose` (or JIELONG_VERBOSE) asks for everything."""
    if verbose_requested(verbose):
        os.environ["JIELONG_VERBOSE"] = "1"  # stage processes started later see it too
        return
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    for category in (DeprecationWarning, FutureWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
