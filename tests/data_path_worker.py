"""Run by test_data_path.py in a fresh process: the data stages through Prefect on a warm-up folder,
then on the folder under test; prints the peak RSS after each and the stage summaries as JSON.
The thread runner keeps every shard job in this process, so its peak RSS covers all the work."""

import json
import resource
import sys

from jielong.flows.entry_points import run_pipeline


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(folder: str, workspace: str, extra: list[str]) -> list[dict]:
    overrides = [f"workspace={workspace}", f"ingest.sources=[{{kind: files, path: '{folder}'}}]", "runner.kind=thread",
                 f"mlflow.tracking_uri=sqlite:///{workspace}/mlflow.db", *extra]
    return run_pipeline("tiny", overrides, only=["ingest", "clean", "dedup"])


if __name__ == "__main__":
    warm_folder, folder, workspace, *extra = sys.argv[1:]
    run(warm_folder, workspace + "-warm", extra)
    warm = peak_mb()
    summaries = run(folder, workspace, extra)
    print(json.dumps({"warm_peak_mb": warm, "peak_mb": peak_mb(), "summaries": summaries}))
