"""The whole pipeline on one GPU, stage by stage, and what bf16 evaluation costs in accuracy.

    python bench/bench_gpu_pipeline.py                    # configs/gpu.yaml in a fresh workspace
    python bench/bench_gpu_pipeline.py --config tiny --set pretrain.steps=20 --no-precision   # a quick look

1. `jielong run --config gpu` in a fresh workspace (a subprocess, as a user runs it): the seconds of
   every stage, training tokens/s and MFU from the stage manifests, the whole command's wall time.
2. The pretrained model evaluated again with `--set evaluate.precision=fp32` (`jielong eval`), against
   the pipeline's own evaluation of it (precision auto: bf16 autocast on CUDA): every metric's
   difference, the largest per family (perplexity, calibration, in-context accuracy and calibration,
   kNN-LM), and each
   evaluation's seconds in both precisions.

Writes pipeline.json, precision.json, run.log (and eval_fp32.log) into --out ($OUT if set, else
bench/out/gpu_pipeline/), and prints Markdown tables for bench/RESULTS.md. Exit status 1 when a command
failed (what ran is still written).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("ingest", "clean", "dedup", "tokenize", "pretrain", "instruct", "eval_pretrain", "eval_instruct")
FAMILIES = ("perplexity", "calibration", "in-context accuracy", "in-context calibration", "kNN-LM")
RELATIVE = ("perplexity", "kNN-LM")  # compared by relative difference; accuracies and calibration errors by absolute


def jielong(*args: str, log: Path, env: dict) -> tuple[int, float]:
    """Runs the jielong CLI as a user would; its output goes to `log` and to this process's stdout."""
    started = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.Popen([sys.executable, "-m", "jielong.flows.cli", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
        for line in proc.stdout:
            handle.write(line)
            sys.stdout.write(line)
        proc.wait()
    return proc.returncode, time.perf_counter() - started


def newest_manifest(workspace: Path, stage: str) -> dict | None:
    manifests = sorted(workspace.glob(f"{stage}/*/manifest.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(manifests[-1].read_text()) | {"path": str(manifests[-1].parent)} if manifests else None


def stage_rows(workspace: Path) -> list[dict]:
    rows = []
    for stage in STAGES:
        manifest = newest_manifest(workspace, stage)
        if manifest is None:
            rows.append({"stage": stage, "ran": False})
            continue
        metrics, details = manifest.get("metrics", {}), manifest.get("details", {})
        rows.append({"stage": stage, "ran": True, "key": manifest["key"], "seconds": manifest["timings"].get("seconds"),
                     "tokens_per_s": metrics.get("tokens_per_s"), "mfu": metrics.get("mfu"),
                     "device": details.get("device"), "precision": details.get("precision"), "loss": details.get("loss"),
                     "headline": {name: metrics[name] for name in ("final_val_loss", "perplexity", "bits_per_byte")
                                  if name in metrics}})
    return rows


def family_of(name: str) -> str | None:
    if name.startswith("icl/"):
        return "in-context accuracy" if "/acc" in name else "in-context calibration"
    if name.startswith("knnlm"):
        return "kNN-LM"
    if name.startswith(("ece", "brier", "top_brier", "accuracy", "mean_confidence")):
        return "calibration"
    if name.startswith(("perplexity", "bits_per_byte", "word_perplexity", "nll_per_token", "by_source/")):
        return "perplexity"
    return None


def compare_precisions(bf16: dict, fp32: dict) -> dict:
    """Every metric both evaluations have: |bf16 - fp32| and relative to fp32; the largest per family
    (relative for perplexities, absolute for accuracies and calibration errors)."""
    skip = ("seconds", "_std", "parameters", "documents", "bytes", "tokens", "chance", "words", "datastore_size", "k_used",
            "predictions")
    diffs = {}
    for name, reference in fp32.items():
        value = bf16.get(name)
        if value is None or any(s in name for s in skip) or not all(map(math.isfinite, (value, reference))):
            continue
        diffs[name] = {"fp32": reference, "bf16": value, "abs": abs(value - reference),
                       "rel": abs(value - reference) / abs(reference) if reference else None}
    largest = {}
    for family in FAMILIES:
        members = {n: d for n, d in diffs.items() if family_of(n) == family}
        if members:
            measure = "rel" if family in RELATIVE else "abs"
            name = max(members, key=lambda n: members[n][measure] or 0.0)
            largest[family] = {"metric": name, **members[name], "metrics": len(members)}
    return {"metrics": diffs, "largest": largest}


def section_seconds(eval_dir: str) -> dict:
    report = json.loads((Path(eval_dir) / "report.json").read_text())
    return {name: round(value, 2) for name, value in report.get("timings", {}).items()}


def machine() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import transformers

        info["transformers"] = transformers.__version__
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True).stdout.strip() or None
    except Exception:  # a copy of the tree without git
        info.setdefault("commit", None)
    return info


def markdown(pipeline: dict, precision: dict | None) -> str:
    lines = [f"Machine: {pipeline['machine']}. Command: `{pipeline['command']}`, wall {pipeline['wall_seconds']:.0f} s.", "",
             "| stage | seconds | device | precision | loss | tokens/s | MFU | headline |", "|---|---:|---|---|---|---:|---:|---|"]
    for row in pipeline["stages"]:
        if not row["ran"]:
            lines.append(f"| {row['stage']} | did not run | | | | | | |")
            continue
        tps = f"{row['tokens_per_s']:,.0f}" if row.get("tokens_per_s") else ""
        mfu = f"{row['mfu']:.1%}" if row.get("mfu") else ""
        head = ", ".join(f"{k} {v:.4g}" for k, v in row["headline"].items())
        lines.append(f"| {row['stage']} | {row['seconds']:.1f} | {row.get('device') or ''} | {row.get('precision') or ''} "
                     f"| {row.get('loss') or ''} | {tps} | {mfu} | {head} |")
    if precision:
        lines += ["", "| family | metrics compared | largest difference: metric | fp32 | bf16 | abs | rel |",
                  "|---|---:|---|---:|---:|---:|---:|"]
        for family, d in precision["comparison"]["largest"].items():
            rel = f"{d['rel']:.2e}" if d["rel"] is not None else ""
            lines.append(f"| {family} | {d['metrics']} | {d['metric']} | {d['fp32']:.6g} | {d['bf16']:.6g} | {d['abs']:.2e} | {rel} |")
        lines += ["", "| evaluation | seconds fp32 | seconds bf16 |", "|---|---:|---:|"]
        for name, seconds in precision["seconds_fp32"].items():
            lines.append(f"| {name} | {seconds} | {precision['seconds_bf16'].get(name, '')} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="gpu")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="passed to jielong run and eval")
    parser.add_argument("--workspace", type=Path, help="default: a fresh temporary folder")
    parser.add_argument("--no-precision", action="store_true", help="skip the fp32 evaluation")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "bench/out/gpu_pipeline"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    workspace = args.workspace or Path(tempfile.mkdtemp(prefix="jielong-gpu-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    sets = [f"--set=workspace={workspace}", *(f"--set={s}" for s in args.overrides)]

    rc, wall = jielong("run", "--config", args.config, *sets, log=args.out / "run.log", env=env)
    pipeline = {"machine": machine(), "command": f"jielong run --config {args.config} {' '.join(args.overrides)}".strip(),
                "returncode": rc, "wall_seconds": wall, "workspace": str(workspace), "stages": stage_rows(workspace)}
    (args.out / "pipeline.json").write_text(json.dumps(pipeline, indent=1))

    precision = None
    pretrained, evaluated = newest_manifest(workspace, "pretrain"), newest_manifest(workspace, "eval_pretrain")
    if not args.no_precision and pretrained and evaluated:
        rc_eval, eval_wall = jielong("eval", "--model", f"{pretrained['path']}/model", "--config", args.config, *sets,
                                     "--set=evaluate.precision=fp32", log=args.out / "eval_fp32.log", env=env)
        fp32 = newest_manifest(workspace, "eval_model")
        if fp32:
            precision = {"returncode": rc_eval, "wall_seconds": eval_wall,
                         "comparison": compare_precisions(evaluated["metrics"], fp32["metrics"]),
                         "seconds_bf16": section_seconds(evaluated["path"]), "seconds_fp32": section_seconds(fp32["path"])}
            (args.out / "precision.json").write_text(json.dumps(precision, indent=1))
        rc = rc or rc_eval
    table = markdown(pipeline, precision)
    (args.out / "tables.md").write_text(table + "\n")
    print(table)
    return 1 if rc else 0


if __name__ == "__main__":
    sys.exit(main())
