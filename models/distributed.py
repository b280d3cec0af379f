"""Training in torchrun workers: the job a stage hands them, the launch, and the worker entry point.

The stage process (`train_in_workers`) writes a job folder and starts torchrun
(`python -m torch.distributed.run`) on it; torchrun starts `nproc` workers on this node, each
`python -m models.distributed JOB.json`, and joins them with the other nodes' workers through its
rendezvous. Each worker loads the model from the job's safetensors folder and the batches from the
job's spec, as one process does, and runs the same `models.train.train()` loop under DDP or FSDP
(models/parallel.py).

    <job>/job.json        what to train: settings, model folder, batch spec, checkpoint folder, ...
         /initial/        the model before training (a Hugging Face folder, safetensors)
         /metrics.jsonl   rank 0's metric points, one JSON list per line, while it trains
         /report.json     rank 0's TrainReport, once the last step is done
         /errors/rank-N.json   an exception of worker N (type, message, where, traceback)
         /workers.log     torchrun's and its workers' output (workers-<host>-<pid>.log: a joining node's)

Metrics stream while training: the stage process tails metrics.jsonl and hands each line to its `log`
(MLflow, through the stage context), so curves appear as they would for one process. The final
weights are the last checkpoint (rank 0 writes one at the last step), loaded back into the stage's
model. A failed worker becomes one `WorkersFailed` message naming the rank and its error; the rest of
every rank's output stays in workers.log.

The workers must see the job folder at the same path (on several nodes: a shared filesystem).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch



class WorkersFailed(RuntimeError):
    """Distributed training stopped; the message says where and why."""


# ---------------------------------------------------------------- the stage's side


def train_in_workers(model, batches_spec: dict, settings: dict, checkpoint_dir: Path, job_dir: Path,
                     log: Callable, prefix: str, peak_cache: Path, rdzv_id: str):
    """Train `model` in torchrun workers (settings["distributed"]: ddp or fsdp); its weights are then the
    trained ones, on the device it trained on. Returns rank 0's TrainReport."""
    from safetensors.torch import load_model

    from jielong.models import checkpoint
    from jielong.models.train import TrainReport, resolve_device

    device = resolve_device(settings["device"])
    backend = resolve_backend(settings["backend"], device, settings["nproc"])
    prepare_job_dir(job_dir)
    model.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the workers need this process's share of GPU 0
    save_initial_model(model, job_dir / "initial")
    job = {
        "mode": settings["distributed"], "backend": backend, "device": device,
        "settings": {**settings, "device": device}, "model": str(job_dir / "initial"), "batches": batches_spec,
        "checkpoints": str(checkpoint_dir), "prefix": prefix, "peak_cache": str(peak_cache),
    }
    write_json(job_dir / "job.json", job)
    try:
        run_torchrun(job_dir / "job.json", settings["nproc"], settings["nnodes"], settings.get("rdzv_endpoint"),
                     rdzv_id, on_points=log, total_steps=settings["steps"], desc=f"{prefix} ({settings['distributed']})")
    finally:
        (job_dir / "job.json").unlink()  # a job file exists while its workers may start: what `jielong join` waits for
    report = json.loads((job_dir / "report.json").read_text())
    report["curves"] = {name: [tuple(point) for point in points] for name, points in report["curves"].items()}
    load_model(model, str(checkpoint.latest(checkpoint_dir) / "model.safetensors"))
    model.to(device)
    return TrainReport(**report)


def resolve_backend(name: str, device: str, nproc: int) -> str:
    """auto: nccl on CUDA, gloo on CPU. Checks that this node can run `nproc` workers of that kind."""
    backend = name if name != "auto" else ("nccl" if device == "cuda" else "gloo")
    if backend == "nccl" and device != "cuda":
        raise ValueError("backend nccl needs CUDA devices: use backend gloo (or auto) on CPU")
    if device == "cuda" and nproc > torch.cuda.device_count():
        raise ValueError(f"nproc ({nproc}) is more than this node's {torch.cuda.device_count()} CUDA device(s): "
                         "one process per GPU")
    return backend


def prepare_job_dir(job_dir: Path) -> None:
    """Clear what an earlier launch left (its metrics, report and errors); checkpoints live elsewhere."""
    job_dir.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.jsonl", "report.json", "job.json"):
        (job_dir / name).unlink(missing_ok=True)
    for stale in (job_dir / "errors").glob("*.json"):
        stale.unlink()


def save_initial_model(model, path: Path) -> None:
    import shutil

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def write_json(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


def torchrun_arguments(job: Path, nproc: int, nnodes: int, rdzv_endpoint: str | None, rdzv_id: str) -> list[str]:
    """One node: a standalone rendezvous on a free local port. Several: c10d at `rdzv_endpoint`, which every
    node's torchrun names with the same `rdzv_id`."""
    if nnodes == 1:
        where = ["--standalone"]
    else:
        where = [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}"]
    return [*where, f"--nproc-per-node={nproc}", "--max-restarts=0", "-m", "jielong.models.distributed", str(job)]


def run_torchrun(job: Path, nproc: int, nnodes: int = 1, rdzv_endpoint: str | None = None, rdzv_id: str = "jielong",
                 on_points: Callable | None = None, total_steps: int | None = None, desc: str = "workers",
                 log_name: str = "workers.log") -> None:
    """Run torchrun on `job` until its workers end, handing rank 0's metric points to `on_points` as they
    come; raises WorkersFailed when a worker fails. Also what `jielong join` runs on the other nodes
    (each with a `log_name` of its own: the job folder is shared)."""
    from tqdm import tqdm

    out = job.parent
    env = dict(os.environ)  # the workers import this same installed jielong
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    env.setdefault("OMP_NUM_THREADS", str(max(1, cpus // nproc)))  # the node's cores shared, not oversubscribed
    command = [sys.executable, "-m", "jielong.models.distributed", "--torchrun", str(os.getpid()),
               *torchrun_arguments(job, nproc, nnodes, rdzv_endpoint, rdzv_id)]
    metrics = MetricsTail(out / "metrics.jsonl")
    bar = tqdm(total=total_steps, desc=desc, unit="step", leave=False, disable=None if on_points else True)
    with open(out / log_name, "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env, cwd=str(out))
        try:
            while process.poll() is None:
                relay(metrics.read(), on_points, bar)
                time.sleep(0.25)
            relay(metrics.read(), on_points, bar)
        finally:
            bar.close()
            stop(process)
    if process.returncode != 0:
        raise WorkersFailed(failure_message(out, process.returncode, nproc * nnodes, out / log_name))


def relay(batches: list[list], on_points: Callable | None, bar) -> None:
    for points in batches:
        if on_points is not None:
            on_points([tuple(point) for point in points])
        bar.update(max(step for _, _, step in points) - bar.n)


def stop(process: subprocess.Popen) -> None:
    """torchrun stops its workers on SIGTERM; waited for, so nothing trains on after we return."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class MetricsTail:
    """The complete lines appended to a JSON-lines file since the last read."""

    def __init__(self, path: Path):
        self.path, self.offset, self.partial = path, 0, b""

    def read(self) -> list:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]


def failure_message(out: Path, returncode: int, world_size: int, log: Path) -> str:
    """The first error any worker reported (others often fail after it: a peer went away), or else the
    end of this node's workers' log."""
    reports = []
    for path in (out / "errors").glob("rank-*.json"):
        try:
            reports.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    if reports:
        first = min(reports, key=lambda report: report["time"])
        return (f"distributed training failed on rank {first['rank']} of {world_size}: {first['type']}: "
                f"{first['message']} (at {first['where']}); every worker's output is in {log}")
    try:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
    except OSError:
        tail = "(no log)"
    return f"distributed training stopped (torchrun exit status {returncode}) without a worker's error; the end of {log}:\n{tail}"


# ---------------------------------------------------------------- the workers' side


def start_process_group(backend: str, device: str) -> None:
    """Join the process group torchrun's environment describes; a GPU worker uses GPU LOCAL_RANK."""
    import torch.distributed as dist

    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend)


def worker(job_path: Path) -> None:
    from jielong.models.data import batches_from_spec
    from jielong.models.parallel import strategy
    from jielong.models.presets import load_model
    from jielong.models.train import train

    job = json.loads(job_path.read_text())
    out = job_path.parent
    start_process_group(job["backend"], job["device"])
    parallel = strategy(job["mode"], job["device"])
    model = load_model(job["model"])
    batches = batches_from_spec(job["batches"])
    settings = SimpleNamespace(**job["settings"])
    log = append_points(out / "metrics.jsonl") if parallel.is_main else (lambda points: None)
    report = train(model, batches, settings, Path(job["checkpoints"]), log, job["prefix"], Path(job["peak_cache"]),
                   desc=job["prefix"], parallel=parallel)
    if parallel.is_main:
        write_json(out / "report.json", asdict(report))
    parallel.barrier()  # every worker ends after rank 0's last checkpoint and report are written


def append_points(path: Path) -> Callable:
    def log(points: list) -> None:
        with open(path, "a") as handle:
            handle.write(json.dumps([list(point) for point in points]) + "\n")
            handle.flush()
    return log


def report_error(out: Path, error: BaseException) -> None:
    frames = traceback.extract_tb(error.__traceback__)
    where = f"{frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else "?"
    (out / "errors").mkdir(parents=True, exist_ok=True)
    write_json(out / "errors" / f"rank-{os.environ.get('RANK', '?')}.json", {
        "rank": os.environ.get("RANK", "?"), "type": type(error).__name__, "message": str(error).strip(),
        "where": where, "time": time.time(), "traceback": traceback.format_exception(error),
    })


def torchrun_tied_to(parent_pid: int, arguments: list[str]) -> None:
    """Run torchrun in this process, which receives SIGTERM when its parent (the stage) dies, so killed
    stages leave no training behind (torchrun then stops its workers)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent died before the line above
        sys.exit("the stage that started torchrun is gone")
    from torch.distributed.run import main as torchrun

    torchrun(arguments)


def main(argv: list[str]) -> None:
    if argv[:1] == ["--torchrun"]:
        torchrun_tied_to(int(argv[1]), argv[2:])
        return
    job_path = Path(argv[0])
    try:
        worker(job_path)
    except BaseException as error:
        report_error(job_path.parent, error)
        raise
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
