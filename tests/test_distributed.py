"""Training under torch.distributed on CPU (gloo): DDP and FSDP2 workers started by torchrun follow one
process's loss curve at the same global batch, a killed run resumes to the same weights, several nodes
meet in a c10d rendezvous (two agents on loopback), mistakes read as one message, and the GPU
benchmark's code path runs with only torch, transformers and models/.

Tolerances: with fp32 the processes compute the same sums in another order (each takes half of the
rows; DDP/FSDP then add the halves' gradients), so losses agree to float32 rounding (a loss of ~6 has
an ulp of 4.8e-7) and drift a little as training amplifies it. Measured on this machine (2 cores),
largest difference from one process over the 20 steps of the tiny preset: train loss 7.2e-7 and
validation loss 3.6e-7 (DDP, 2 processes, and 2 nodes x 1 process), 7.2e-7 and 2.4e-7 (FSDP2, 2
processes); 6 instruct steps on 2 nodes (an earlier version of the test) 4.8e-7 and 2.1e-7.
CURVE_TOLERANCE = 1e-4, over a hundred times that,
leaves room for other CPUs' kernels and longer drift yet fails on any real mistake: a wrongly scaled
loss (x2, or the mean of each process's mean with masked targets) moves losses or gradients by 1e-2
or more within the first steps.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import FAST_TRAINING, free_port, run_chain
from jielong.flows.stages import STAGES
from jielong.models.distributed import MetricsTail, resolve_backend, train_in_workers
from jielong.models.parallel import DDPProcesses
from jielong.models.train import loss_on, micro_loss
from jielong.tasks.config import ConfigError, UserError, load_config
from jielong.tasks.core.contract import compute_artifact, work_dir
from jielong.tasks.lib.training import job_dir

ROOT = Path(__file__).resolve().parent.parent
CURVE_TOLERANCE = 1e-4
STEPS = 20
BASE = [*FAST_TRAINING, "ingest.sources=[{kind: builtin, limit: 25}]", "pretrain.precision=fp32",
        f"pretrain.steps={STEPS}", "pretrain.checkpoint_every=5", "pretrain.eval_every=5"]
DDP = ["pretrain.distributed=ddp", "pretrain.nproc=2"]


def overrides(workspace: Path, *extra: str) -> list[str]:
    return [f"workspace={workspace}", *BASE, *extra]


def stage(name: str):
    return next(s for s in STAGES if s.name == name)


def run_stage(name: str, cfg, inputs: dict) -> tuple:
    """(artifact, metric points logged while it ran)."""
    points = []
    key = stage(name).key(cfg, {n: a.key for n, a in inputs.items()})
    artifact, _ = compute_artifact(stage(name), cfg, key, inputs, log=points.extend)
    return artifact, points


def curve(points, name: str) -> dict[int, float]:
    return {step: value for metric, value, step in points if metric.endswith("/" + name)}


def largest_difference(a: dict[int, float], b: dict[int, float]) -> float:
    assert a.keys() == b.keys() and a, "the same steps logged"
    return max(abs(a[step] - b[step]) for step in a)


def weights(artifact) -> dict[str, torch.Tensor]:
    return load_file(str(artifact.path / "model" / "model.safetensors"))


def processes_naming(text: str) -> list[int]:
    """Processes whose command line contains `text` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The chain up to instruct, trained in this one process: the reference curves."""
    workspace = tmp_path_factory.mktemp("distributed") / "ws"
    cfg = load_config("tiny", overrides(workspace))
    artifacts = run_chain(cfg, "tokenize")
    artifacts["pretrain"], pretrain_points = run_stage("pretrain", cfg, {"tokenize": artifacts["tokenize"]})
    return workspace, artifacts, pretrain_points


@pytest.fixture(scope="module")
def ddp_run(one_process):
    """Pretrain with 2 DDP processes at the same global batch, uninterrupted."""
    workspace, artifacts, _ = one_process
    cfg = load_config("tiny", overrides(workspace, *DDP))
    artifact, points = run_stage("pretrain", cfg, {"tokenize": artifacts["tokenize"]})
    return cfg, artifact, points


@pytest.mark.slow
def test_ddp_processes_follow_one_process_s_curve(one_process, ddp_run):
    _, artifacts, reference = one_process
    _, artifact, points = ddp_run
    assert artifact.key != artifacts["pretrain"].key, "the world size enters the key"
    for name in ("loss", "val_loss", "grad_norm"):
        assert largest_difference(curve(points, name), curve(reference, name)) < CURVE_TOLERANCE * (10 if name == "grad_norm" else 1)
    assert curve(points, "lr") == curve(reference, "lr")
    assert len(curve(points, "loss")) == STEPS, "rank 0's metrics reached the stage's log, every step"
    assert {m for m, _, _ in points} == {m for m, _, _ in reference}
    one, two = weights(artifacts["pretrain"]), weights(artifact)
    assert max(float((one[k] - two[k]).abs().max()) for k in one) < 1e-3
    manifest = artifact.manifest
    assert manifest["config"]["pretrain"]["distributed"] == "ddp"
    assert manifest["metrics"]["tokens_per_s"] > 0 and manifest["details"]["tokens_seen"] == STEPS * 4 * 64


@pytest.mark.slow
def test_a_killed_ddp_run_resumes_to_the_uninterrupted_run_s_weights(one_process, ddp_run):
    _, artifacts, _ = one_process
    cfg, uninterrupted, _ = ddp_run
    reference = weights(uninterrupted)
    workspace = cfg.workspace_path()
    shutil.rmtree(uninterrupted.path)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    stage_process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "train_worker.py"), *overrides(workspace, *DDP)],
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = work_dir(workspace, "pretrain", uninterrupted.key) / "checkpoints"
    deadline = time.time() + 180
    while time.time() < deadline and stage_process.poll() is None:
        latest = checkpoints / "latest"
        if latest.exists() and int(latest.read_text().split("-")[1]) >= 5:
            break
        time.sleep(0.05)
    assert stage_process.poll() is None, "the run finished before it could be interrupted"
    job = job_dir(workspace, "pretrain", uninterrupted.key) / "job.json"
    stage_process.send_signal(signal.SIGKILL)  # the stage alone: torchrun and its workers must follow
    stage_process.wait()
    deadline = time.time() + 60
    while processes_naming(str(job)) and time.time() < deadline:
        time.sleep(0.1)
    assert not processes_naming(str(job)), "torchrun and its workers stop when the stage is killed"
    assert not (uninterrupted.path / "manifest.json").exists()

    resumed, _ = run_stage("pretrain", cfg, {"tokenize": artifacts["tokenize"]})
    assert 5 <= resumed.manifest["metrics"]["resumed_from_step"] < STEPS
    again = weights(resumed)
    assert all(torch.equal(reference[k], again[k]) for k in reference), "resumed weights differ"


@pytest.mark.slow
def test_fsdp_follows_the_curve_and_resumes_from_its_gathered_checkpoint(one_process, tmp_path):
    """FSDP2 on gloo, called as the stage calls it; then rewound to its first checkpoint and resumed."""
    from jielong.models.presets import build_model
    from jielong.models.tokenizer import load_tokenizer

    workspace, artifacts, reference = one_process
    cfg = load_config("tiny", overrides(workspace, "pretrain.distributed=fsdp", "pretrain.nproc=2"))
    tokenized = artifacts["tokenize"]
    details = tokenized.manifest["details"]
    tokenizer = load_tokenizer(tokenized.path / "tokenizer")
    settings = cfg.pretrain
    spec = {"kind": "packed", "train": str(tokenized.path / "tokens" / "train.bin"),
            "validation": str(tokenized.path / "tokens" / "validation.bin"), "dtype": details["dtype"],
            "context": details["context_length"], "batch_size": settings.batch_size, "grad_accum": settings.grad_accum,
            "seed": settings.seed, "eval_batches": settings.eval_batches}

    def train_fsdp(points: list):
        model = build_model(config_of(tokenizer, details), settings.seed)
        report = train_in_workers(model, spec, settings.model_dump(mode="json"), tmp_path / "checkpoints",
                                  tmp_path / "job", points.extend, "pretrain", tmp_path / "peak.json", "test-fsdp")
        return report, {k: v.clone() for k, v in model.state_dict().items()}

    points: list = []
    report, trained = train_fsdp(points)
    for name in ("loss", "val_loss"):
        assert largest_difference(curve(points, name), curve(reference, name)) < CURVE_TOLERANCE
    assert report.steps == STEPS and report.resumed_from == 0
    from safetensors.torch import save_model

    save_model(build_model(config_of(tokenizer, details), 0), str(tmp_path / "one-process.safetensors"))
    gathered = load_file(str(tmp_path / "checkpoints" / f"step-{STEPS:06d}" / "model.safetensors"))
    one_process_layout = load_file(str(tmp_path / "one-process.safetensors"))
    assert {k: v.shape for k, v in gathered.items()} == {k: v.shape for k, v in one_process_layout.items()}, \
        "full, unsharded tensors, named as one process's checkpoint names them"

    (tmp_path / "checkpoints" / "latest").write_text(f"step-{STEPS - 5:06d}")  # the one kept before the last
    resumed, again = train_fsdp([])
    assert resumed.resumed_from == STEPS - 5
    assert all(torch.equal(trained[k], again[k]) for k in trained), "resumed FSDP weights differ"


def config_of(tokenizer, details):
    """The tiny preset's config as pretrain builds it."""
    from jielong.models.presets import model_config

    return model_config("tiny", len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                        tokenizer.pad_token_id, details["context_length"])


@pytest.mark.slow
def test_a_worker_s_error_is_one_message(one_process):
    workspace, artifacts, _ = one_process
    cfg = load_config("tiny", overrides(workspace, *DDP, "pretrain.seed=7"))
    key = stage("pretrain").key(cfg, {"tokenize": artifacts["tokenize"].key})
    broken = work_dir(workspace, "pretrain", key) / "checkpoints" / "step-000005"
    broken.mkdir(parents=True)
    for name in ("model.safetensors", "optimizer.pt", "rng.pt"):
        (broken / name).write_bytes(b"not a checkpoint")
    (broken / "state.json").write_text("{}")
    (broken.parent / "latest").write_text(broken.name)
    with pytest.raises(UserError) as caught:
        run_stage("pretrain", cfg, {"tokenize": artifacts["tokenize"]})
    message = str(caught.value)
    assert message.startswith("pretrain: distributed training failed on rank ") and " of 2: SafetensorError: " in message
    assert "Traceback" not in message and message.endswith("workers.log")
    assert "SafetensorError" in (job_dir(workspace, "pretrain", key) / "workers.log").read_text()


@pytest.mark.slow
def test_two_nodes_meet_in_a_c10d_rendezvous_and_train_like_one_process(one_process, monkeypatch):
    """The README's multi-node recipe on loopback: this process runs the stage (one torchrun agent), a
    `jielong join` process with the same config is the other node."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # each "node" would give its one worker every core of this machine
    workspace, artifacts, reference = one_process
    two_nodes = overrides(workspace, "pretrain.distributed=ddp", "pretrain.nnodes=2",
                          f"pretrain.rdzv_endpoint=127.0.0.1:{free_port()}")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    other_node = subprocess.Popen([sys.executable, "-m", "jielong.flows.cli", "join", *[f"--set={o}" for o in two_nodes]],
                                  env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        artifact, points = run_stage("pretrain", load_config("tiny", two_nodes), {"tokenize": artifacts["tokenize"]})
        output, _ = other_node.communicate(timeout=120)
    finally:
        other_node.kill()
    assert other_node.returncode == 0, output
    assert "pretrain: this node's workers are done" in output
    for name in ("loss", "val_loss"):
        assert largest_difference(curve(points, name), curve(reference, name)) < CURVE_TOLERANCE
    assert artifact.manifest["config"]["pretrain"]["nnodes"] == 2


def test_workers_build_instruct_s_batches_as_the_stage_does(tmp_path: Path):
    """What instruct hands its workers (models/distributed.py) gives the batches it trains on itself."""
    from jielong.models.data import PairBatches, batches_from_spec
    from jielong.tasks.instruct import pairs_spec

    train = [([1, 2, 3, 4][: n], [-100, 3, 4, 5][: n]) for n in (2, 3, 4, 3, 2)]
    heldout = [([7, 8, 9], [-100, -100, 2])]
    cfg = load_config("tiny", ["instruct.batch_size=2", "instruct.grad_accum=2", "instruct.eval_batches=1"]).instruct
    ours = PairBatches(train, heldout, 0, cfg.batch_size, cfg.grad_accum, cfg.seed, cfg.eval_batches)
    theirs = batches_from_spec(json.loads(json.dumps(pairs_spec(tmp_path, train, heldout, 0, cfg))))
    for step, micro in [(0, 0), (0, 1), (3, 1)]:
        a, b = ours.get(step, micro), theirs.get(step, micro)
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(ours.validation(), theirs.validation()) for k in x)


def test_each_process_s_share_of_a_masked_batch_adds_up_to_the_batch_mean():
    """The loss each process backpropagates: summed over processes and divided by the world size, it is
    the mean over the global batch's target tokens, however the masked (-100) targets fall."""
    from jielong.models.presets import build_model, model_config

    model = build_model(model_config("tiny", 64, 0, 0, 1, 16), seed=0)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (4, 16), generator=generator)
    targets = ids.roll(-1, dims=1)
    targets[:2, :12] = -100  # the first process's rows hold far fewer target tokens
    batch = {"input_ids": ids, "targets": targets}
    shares = []
    for rank in range(2):
        process = DDPProcesses.__new__(DDPProcesses)
        process.rank, process.world_size = rank, 2
        shares.append(float(micro_loss(model, batch, "cpu", "fp32", process).detach()))
    assert sum(shares) / 2 == pytest.approx(float(loss_on(model, batch, "cpu", "fp32").detach()), rel=1e-6)


def test_settings_mistakes_are_clear_messages():
    with pytest.raises(ConfigError, match=r"batch_size \(6\) is the global batch, split evenly over nproc x nnodes = 4 "
                                          r"processes: make it a multiple of 4"):
        load_config("tiny", ["pretrain.distributed=ddp", "pretrain.nproc=4", "pretrain.batch_size=6"])
    with pytest.raises(ConfigError, match="distributed: none trains in this process alone"):
        load_config("tiny", ["instruct.nproc=2"])
    with pytest.raises(ConfigError, match="needs rdzv_endpoint"):
        load_config("tiny", ["pretrain.distributed=fsdp", "pretrain.nnodes=2"])
    with pytest.raises(ValueError, match="backend nccl needs CUDA"):
        resolve_backend("nccl", "cpu", 2)
    cfg = load_config("tiny", ["pretrain.distributed=ddp", "pretrain.nproc=2", "pretrain.batch_size=6"])
    assert cfg.pretrain.nproc == 2


def test_distributed_settings_at_their_defaults_leave_keys_as_they_were():
    default = load_config("tiny")
    view = stage("pretrain").view(default)
    assert not {"distributed", "nproc", "nnodes", "backend", "rdzv_endpoint"} & set(view.output_dump()["pretrain"])
    ddp = stage("pretrain").view(load_config("tiny", DDP)).output_dump()["pretrain"]
    assert (ddp["distributed"], ddp["nproc"]) == ("ddp", 2) and "rdzv_endpoint" not in ddp


def test_metrics_tail_hands_over_complete_lines_only(tmp_path: Path):
    path = tmp_path / "metrics.jsonl"
    tail = MetricsTail(path)
    assert tail.read() == []
    path.write_text('[["a", 1.0, 1]]\n[["b", 2.0')
    assert tail.read() == [[["a", 1.0, 1]]]
    with open(path, "a") as handle:
        handle.write(', 2]]\n')
    assert tail.read() == [[["b", 2.0, 2]]]


HIDE_PACKAGES = '''
"""Python without these packages: find_spec says absent and an import fails, as on a bare GPU machine."""
import importlib.util, sys
HIDDEN = {"prefect", "mlflow", "pydantic", "pydantic_core", "tasks", "flows", "accelerate"}
_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: None if name.split(".")[0] in HIDDEN else _find_spec(name, package)
class Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
sys.meta_path.insert(0, Hide())
'''


@pytest.mark.bench
def test_the_gpu_benchmark_runs_on_cpu_with_only_torch_transformers_and_models(tmp_path: Path):
    """bench/bench_gpu.py's whole path (one process, then torchrun DDP with 2 gloo processes), with the
    packages a GPU machine lacks hidden from it and its workers; and no silent CPU run when CUDA is asked."""
    (tmp_path / "hide").mkdir()
    (tmp_path / "hide" / "sitecustomize.py").write_text(HIDE_PACKAGES)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "hide"), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "cpu.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_gpu.py"), "--device", "cpu", "--steps", "2",
                           "--warmup", "1", "--presets", "tiny", "--batch-tokens", "512", "--out", str(out)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert [(r["mode"], r["devices"], r["timed_steps"]) for r in rows] == [("single", 1, 2), ("ddp", 2, 2)]
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu_measured_peak"] < 1 for r in rows)
    assert rows[1]["tokens_per_step"] == 2 * rows[0]["tokens_per_step"], "each DDP process keeps the one-device batch"
    assert "| tiny | ddp | 2 |" in done.stdout
    if not torch.cuda.is_available():
        refused = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_gpu.py"), "--out", str(tmp_path / "x.json")],
                                 env=env, capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0 and "no CUDA device" in refused.stderr and not (tmp_path / "x.json").exists()


UNINSTALL_JIELONG = '''
"""And jielong not installed, as on a GPU machine with a bare copy of the repository: the editable install's
finders are taken out (bench_gpu.py then links a `jielong` package to the checkout)."""
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path_hooks[:] = [h for h in sys.path_hooks if not getattr(h, "__module__", "").startswith("__editable__")]
sys.path[:] = [p for p in sys.path if "__editable__" not in p]
sys.path_importer_cache.clear()
'''


@pytest.mark.bench
def test_the_gpu_benchmark_arms_run_on_cpu_without_jielong_installed(tmp_path: Path):
    """bench/bench_gpu.py --cpu-smoke: the six arms (plain, jielong, fused; eager and compiled) on a tiny
    model, with jielong uninstalled and the packages a GPU machine lacks hidden; all from the same
    initialisation on the same batches, so the plain loop and jielong's plain loss give the same curve."""
    (tmp_path / "hide").mkdir()
    (tmp_path / "hide" / "sitecustomize.py").write_text(HIDE_PACKAGES + UNINSTALL_JIELONG)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "hide"), "OMP_NUM_THREADS": "2", "OUT": str(tmp_path / "out")}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_gpu.py"), "--cpu-smoke"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "bench_gpu.json").read_text())
    arms = {r["arm"]: r for r in result["arms"]}
    assert list(arms) == ["plain-eager", "plain-compile", "jielong-eager", "jielong-compile", "fused-eager", "fused-compile"]
    assert all("error" not in r and r["tokens_per_s"] > 0 and 0 < r["mfu_measured_peak"] < 1 for r in arms.values())
    assert all(len(r["losses"]) == 3 and r["timed_steps"] == 2 for r in arms.values())
    assert arms["jielong-eager"]["losses"] == arms["plain-eager"]["losses"]
    assert all(r["curve_max_abs_diff"] < 0.05 for r in arms.values())
    assert (tmp_path / "out" / "bench_gpu_curves.png").exists() and "| fused-compile |" in done.stdout
