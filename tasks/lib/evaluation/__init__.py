"""evaluate: one report per model — perplexity and bits per byte, calibration, in-context accuracy
(with Min et al.'s demonstration ablation) and kNN-LM.

    evaluate_model(model_dir, {"train": [...], "validation": [...], "test": [...]}, cfg, out_dir)

One module per evaluation: perplexity.py, calibration.py, icl.py (+ builtin_tasks.py, specs in
data/eval/), knnlm.py, memorization.py; each has `run(inputs) -> SectionResult`, its part of the report,
and one entry in registry.py. evaluation.py runs the enabled ones and assembles the report; report.py
and plots.py write it. The test split is scored once: the same pass gives perplexity, token-level
calibration and the kNN-LM queries.
"""

from jielong.tasks.lib.evaluation.config import EvaluateConfig


def evaluate_model(*args, **kwargs) -> dict:
    """See tasks/lib/evaluation/evaluation.py; imported lazily so that reading a config never imports torch."""
    from jielong.tasks.lib.evaluation.evaluation import evaluate_model as run

    return run(*args, **kwargs)


def read_documents(*args, **kwargs) -> list[dict]:
    from jielong.tasks.lib.evaluation.evaluation import read_documents as read

    return read(*args, **kwargs)


__all__ = ["EvaluateConfig", "evaluate_model", "read_documents"]
