"""Run by test_ingest.py in a fresh process: ingest a small warm-up file, then the file under test, with
the same settings; prints the peak RSS (MB) after each and the second run's counts as JSON.

The peak after the warm-up is the baseline: the imports, the stage's code paths (decompression, the
rejections, the Parquet writers) and the allocator's pools are in place before the file under test is
opened, so the peak's growth over it is what reading that file costs."""

import json
import resource
import sys

from jielong.tasks import ingest
from jielong.tasks.config import load_config
from jielong.tasks.core.contract import compute_artifact


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def run(path: str, workspace: str, extra: list[str]) -> dict:
    cfg = load_config("tiny", [f"workspace={workspace}", f"ingest.sources=[{{kind: files, path: '{path}', text_unit: line}}]",
                               *extra])
    artifact, _ = compute_artifact(ingest.STAGE, cfg, ingest.STAGE.key(cfg, {}), {})
    return artifact.manifest["counts"]


if __name__ == "__main__":
    warm, path, workspace, *extra = sys.argv[1:]
    run(warm, workspace + "-warm", extra)
    baseline = peak_mb()
    counts = run(path, workspace, extra)
    print(json.dumps({"baseline_mb": baseline, "peak_mb": peak_mb(), "counts": counts}))
