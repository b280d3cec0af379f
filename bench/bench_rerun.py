"""The rerun loop: how long a command takes when every stage is cached, and where the time goes.

    .venv/bin/python bench/bench_rerun.py [--before DIR] [--reps 5]    # needs `make run` first

Three commands, each run --reps times (after one unmeasured warm-up), medians reported:

    jielong run --only dedup     one cached stage
    make run                     every stage cached
    jielong stages               prints the keys, runs nothing

With --before DIR (a checkout of earlier code, e.g. `git worktree add --detach ../before main`), the
same commands of that checkout run interleaved with this one's, on the same workspace, with this
interpreter (the checkout goes first on PYTHONPATH): before/after measured back to back. Each uses a
PREFECT_HOME of its own and no PREFECT_API_URL, as on a fresh machine; after a warm-up of each, this
checkout's background Prefect API is started once (timed apart), reused by the measured commands and
stopped at the end.

Then a breakdown of the cached `run --only dedup`, measured inside the process (bench/rerun_phases.py):
imports, the Prefect API, MLflow set-up and calls, and the rest of the flow (Prefect's flow- and
task-run bookkeeping). The machine is shared: each figure comes with the cores other processes used
meanwhile. Writes its section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from results import machine_cpu, write_section  # noqa: E402

VENV = Path(sys.executable).parent.parent

def children_cpu() -> float:
    usage = os.times()
    return usage.children_user + usage.children_system


def commands(checkout: Path, workspace: Path) -> dict[str, list[str]]:
    jielong = [sys.executable, "-m", "jielong.flows.cli"]
    config = ["--set", f"workspace={workspace}"]
    return {
        "jielong run --only dedup": [*jielong, "run", "--only", "dedup", *config],
        "make run": ["make", "-s", "-C", str(checkout), "-o", f"{VENV}/.installed", "run", f"VENV={VENV}",
                     f"ARGS=--set workspace={workspace}"],
        "jielong stages": [*jielong, "stages", *config],
    }


def environment(checkout: Path, prefect_home: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(checkout), "PREFECT_HOME": str(prefect_home)}
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def timed(command: list[str], env: dict[str, str], cwd: Path) -> dict:
    """Wall seconds of one command, and the cores other processes used meanwhile (machine CPU minus
    this command's own; a background server it talks to counts as other)."""
    machine, own = machine_cpu(), children_cpu()
    start = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    other = ((machine_cpu() - machine) - (children_cpu() - own)) / wall
    return {"wall": wall, "other": max(other, 0.0), "stdout": done.stdout, "stderr": done.stderr}


def check_code(checkout: Path, env: dict[str, str]) -> None:
    where = subprocess.run([sys.executable, "-c", "import flows.cli; print(flows.cli.__file__)"], env=env,
                           capture_output=True, text=True, cwd=checkout).stdout.strip()
    if not where.startswith(str(checkout)):
        sys.exit(f"{checkout}: imports flows.cli from {where}, not from the checkout")


def phases(checkout: Path, env: dict[str, str], workspace: Path) -> dict:
    """One cached `run --only dedup` measured inside the process; 'start and exit' is the wall clock
    seen from outside minus what the process measured."""
    script = ROOT / "bench" / "rerun_phases.py"
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        result = timed([sys.executable, str(script), str(workspace), out.name], env, checkout)
        measured = json.loads(Path(out.name).read_text())
    measured["interpreter start and exit"] = result["wall"] - measured.pop("total")
    measured["wall"] = result["wall"]
    measured["other"] = result["other"]
    return measured


def median(values: list[float]) -> float:
    return statistics.median(values)


def stop_background_api(checkout: Path, env: dict[str, str]) -> None:
    subprocess.run([sys.executable, "-m", "jielong.flows.cli", "server", "stop"], env=env, cwd=checkout,
                   capture_output=True, text=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, help="a checkout of the earlier code, measured interleaved")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--workspace", type=Path, default=ROOT / "data")
    args = parser.parse_args()
    workspace = args.workspace.resolve()
    variants = {"after": ROOT}
    if args.before:
        variants = {"before": args.before.resolve(), "after": ROOT}
    homes = {name: Path(tempfile.mkdtemp(prefix=f"bench-rerun-prefect-{name}-")) for name in variants}
    envs = {name: environment(path, homes[name]) for name, path in variants.items()}
    for name, path in variants.items():
        check_code(path, envs[name])
    load_before = os.getloadavg()
    walls: dict[str, dict[str, list[dict]]] = {v: {} for v in variants}
    try:
        # warm-up, not measured: the page cache, the fresh Prefect database's migrations
        for name, path in variants.items():
            first = timed(commands(path, workspace)["jielong run --only dedup"], envs[name], path)
            if "cached" not in first["stdout"]:
                sys.exit(f"{name}: dedup is not cached in {workspace}: run `make run` first\n{first['stdout'][-2000:]}")
        # the first command after `jielong server stop` starts the background API: timed once, apart
        stop_background_api(ROOT, envs["after"])
        first_use = timed(commands(ROOT, workspace)["jielong run --only dedup"], envs["after"], ROOT)
        for rep in range(args.reps):
            for label in commands(ROOT, workspace):
                for name, path in variants.items():
                    result = timed(commands(path, workspace)[label], envs[name], path)
                    if label == "make run" and result["stdout"].count(" cached ") != 8:
                        sys.exit(f"{name}: `make run` did not find all 8 stages cached:\n{result['stdout'][-3000:]}")
                    walls[name].setdefault(label, []).append(result)
                    print(f"rep {rep + 1} {label:26} {name:6} {walls[name][label][-1]['wall']:6.2f} s", flush=True)
        breakdown = {name: [] for name in variants}
        for rep in range(args.reps):
            for name, path in variants.items():
                breakdown[name].append(phases(path, envs[name], workspace))
    finally:
        stop_background_api(ROOT, envs["after"])
        for home in homes.values():
            shutil.rmtree(home, ignore_errors=True)
    load_after = os.getloadavg()
    layouts = {name: mlflow_layout(workspace, path) for name, path in variants.items()}
    same = len({json.dumps(layout, sort_keys=True) for layout in layouts.values()}) == 1
    write_results(variants, walls, breakdown, first_use, args.reps, load_before, load_after, workspace,
                  (same, len(layouts["after"]) - 1))


VOLATILE_TAGS = {"jielong.git_commit", "prefect.flow_run_id", "mlflow.parentRunId"}


def mlflow_layout(workspace: Path, checkout: Path) -> dict:
    """The last all-stage run of this checkout's code in the workspace's MLflow store: the parent's and each
    child's tags (but the commit, flow-run and parent ids), params, metrics and artifact names."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("jielong").experiment_id
    commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    parent = client.search_runs([experiment], f"tags.`jielong.git_commit` = '{commit}' and tags.`jielong.stages` LIKE '%eval_instruct'",
                                order_by=["attributes.start_time DESC"], max_results=1)[0]
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")

    def describe(run) -> dict:
        return {"tags": {k: v for k, v in run.data.tags.items() if k not in VOLATILE_TAGS}, "params": run.data.params,
                "metrics": run.data.metrics, "status": run.info.status,
                "artifacts": sorted(a.path for a in client.list_artifacts(run.info.run_id))}

    return {"parent": describe(parent), **{run.info.run_name: describe(run) for run in children}}


def git_describe(path: Path) -> str:
    head = subprocess.run(["git", "-C", str(path), "log", "-1", "--format=%h %s"], capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no", "--", ".",
                            ":!bench/RESULTS.md"], capture_output=True, text=True).stdout.strip()
    return head.strip()[:70] + (" (+ uncommitted changes)" if dirty else "")


def write_results(variants, walls, breakdown, first_use, reps, load_before, load_after, workspace, layout) -> None:
    cpu = subprocess.run(["sh", "-c", "lscpu | grep 'Model name' | cut -d: -f2"], capture_output=True, text=True).stdout.strip()
    names = list(variants)
    lines = [
        "## Rerun with every stage cached (bench/bench_rerun.py)",
        "",
        f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; machine: {cpu or platform.processor()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}; load average {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after (the machine is shared).",
        f"- Workspace `{workspace}` with every stage of `tiny` cached; no PREFECT_API_URL, a fresh PREFECT_HOME each; "
        f"median of {reps} runs after a warm-up (and the fastest, the one least disturbed by other processes), "
        "variants interleaved; 'other' = cores used by other processes meanwhile (median).",
        *[f"- {name}: `{git_describe(path)}`" for name, path in variants.items()],
        "",
        "| command | " + " | ".join(f"{n}: median (fastest) s | other" for n in names) + " |",
        "|---|" + "---:|---:|" * len(names),
    ]
    for label in walls[names[0]]:
        cells = [f"{median([r['wall'] for r in walls[n][label]]):.2f} ({min(r['wall'] for r in walls[n][label]):.2f}) | "
                 f"{median([r['other'] for r in walls[n][label]]):.2f}" for n in names]
        lines.append(f"| `{label}` | " + " | ".join(cells) + " |")
    lines += ["", f"After `jielong server stop`, the next `jielong run --only dedup` starts the background Prefect API: "
              f"{first_use['wall']:.1f} s (once; not in the medians, where every command reuses it).", ""]
    if len(variants) > 1:
        same, children = layout
        lines += [f"Every `make run` found all 8 stages cached with both codes (same keys). MLflow: the last all-cached "
                  f"run of each code, parent and {children} nested runs, has "
                  + ("the same" if same else "NOT the same")
                  + " run names, tags (but commit and Prefect flow-run ids), params, metrics and artifact names.", ""]
    lines += ["### Where a cached `jielong run --only dedup` spends its time (median seconds, measured in the process)",
              "", "| phase | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for phase in breakdown[names[0]][0]:
        if phase == "other":
            continue
        lines.append(f"| {phase} | " + " | ".join(f"{median([b[phase] for b in breakdown[n]]):.2f}" for n in names) + " |")
    lines.append("| cores used by other processes | " +
                 " | ".join(f"{median([b['other'] for b in breakdown[n]]):.2f}" for n in names) + " |")
    lines += ["", *PHASE_NOTES]
    write_section("bench_rerun", "\n".join(lines))
    print("\n".join(lines))


PHASE_NOTES = [
    "- imports: `import jielong.flows.cli` then `jielong.flows.pipeline` (Prefect, the stage modules and whatever they import at the top).",
    "- Prefect API: finding (after) or starting (before: a temporary server per command) the API the flow reports to.",
    "- MLflow set-up: getting the tracker. Before: `Tracker()` in the flow (importing MLflow, opening the sqlite "
    "store and the experiment); after: taking the tracker process `jielong run` started before importing Prefect.",
    "- MLflow calls: the flow's calls to the tracker (runs, params, metrics, tags, artifacts). After: mostly waiting "
    "for the tracker process to finish loading MLflow; calls whose answer is not needed return at once.",
    "- flow and task-run bookkeeping: the rest of the flow call (Prefect's flow run, task run, states, the stage's "
    "cache lookup).",
    "- interpreter start and exit: the wall clock seen from outside minus what the process measured (Python start-up, "
    "exit handlers, and before: the interpreter freeing every module, which `jielong` now skips).",
]


if __name__ == "__main__":
    main()
