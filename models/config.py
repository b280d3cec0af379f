"""The model and training-loop settings: the `model` section, and the settings of the training loop
(models/train.py) that pretrain and instruct both extend with their own."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from jielong.tasks.core.schema import KEYED_WHEN_SET, NO_OUTPUT, Strict


class ModelConfig(Strict):
    preset: Literal["tiny", "small", "base"] = "tiny"
    context_length: int | None = Field(None, ge=8, description="default: the preset's")
    # a checkpoint (with its tokenizer) to continue from: a Hugging Face folder, a hub name, a .gguf file
    # or builtin:smollm2-135m-instruct (models/imports.py); GGUFs are converted once into <workspace>/models/
    init_from: str | None = None
    # the preset's shape, changed one dimension at a time (e.g. the compute-optimal study's model sizes);
    # a setting left at null keeps the preset's value and stays out of the pretrain key
    hidden_size: int | None = Field(None, ge=8, description="default: the preset's")
    num_layers: int | None = Field(None, ge=1, description="default: the preset's")
    num_heads: int | None = Field(None, ge=1, description="default: the preset's")
    intermediate_size: int | None = Field(None, ge=1, description="default: the preset's")

    @model_validator(mode="after")
    def _shape_fits(self) -> "ModelConfig":
        shape = self.shape_overrides()
        if shape and self.init_from:
            raise ValueError(f"model.init_from brings its own architecture: drop {sorted(shape)}")
        from jielong.models.presets import PRESETS

        spec = {**PRESETS[self.preset], **shape}
        hidden, heads = spec["hidden_size"], spec["num_attention_heads"]
        if hidden % heads or (hidden // heads) % 2:
            raise ValueError(f"model.hidden_size ({hidden}) must split into num_heads ({heads}) heads of an even "
                             "size (rotary embeddings rotate pairs of dimensions)")
        return self

    def shape_overrides(self) -> dict[str, int]:
        return shape_overrides(self.model_dump())


# the model shape settings and their names in the presets (models/presets.py)
SHAPE_NAMES = {"hidden_size": "hidden_size", "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
               "intermediate_size": "intermediate_size"}


MODEL_SHAPE = tuple(f"model.{name}" for name in SHAPE_NAMES)


def shape_overrides(model_settings: dict) -> dict[str, int]:
    """The shape settings given (not null), under the names of the presets."""
    return {SHAPE_NAMES[name]: value for name, value in model_settings.items() if name in SHAPE_NAMES and value is not None}


class TrainConfig(Strict):
    steps: int = Field(300, ge=1)
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(30, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = Field(1.0, gt=0)
    log_every: int = Field(10, ge=1, description="steps between throughput points (tokens/s, MFU)", json_schema_extra=NO_OUTPUT)
    eval_every: int = Field(50, ge=1)
    eval_batches: int = Field(8, ge=1)
    checkpoint_every: int = Field(100, ge=1, description="steps between checkpoints (a resumed run ends with the same weights)",
                                  json_schema_extra=NO_OUTPUT)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU and bf16-capable CPUs
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = False
    seed: int = 1234
    # The loss's implementation (models/loss.py; when each applies: models/train.py). `auto` is the plain
    # loss on CPU and the fused one on CUDA: a function of the resolved device, so it adds no dependence on
    # the machine beyond what `device` and `precision` (whose `auto` also resolves per machine) already
    # carry, and the manifest records what ran (details: device, precision, loss). On CPU `auto` trains as
    # before, bit for bit, so it stays out of keys (KEYED_WHEN_SET) and no stage version changes; on CUDA
    # the fused loss differs from the plain one by float rounding only, the kind of difference CUDA runs
    # already have between them (deterministic algorithms are enforced on CPU only). `on` and `off` name
    # the arithmetic outright, so they enter the key.
    fused_loss: Literal["auto", "on", "off"] = Field(
        "auto", description="output layer + cross-entropy chunk by chunk, without the whole logits; auto: on with "
        "CUDA, off on CPU; not with distributed training", json_schema_extra=KEYED_WHEN_SET)
    # torch.distributed (models/distributed.py). These enter the stage key when set (KEYED_WHEN_SET): the
    # processes train on the same global batches and their curves match one process's within float
    # rounding, but a different world size or backend sums gradients in another order, so the weights
    # differ in their last bits, and a key must name everything that can change the output. With
    # `none` (the default) nothing of them enters the key: keys and weights are those of before.
    distributed: Literal["none", "ddp", "fsdp"] = Field(
        "none", description="none: this process; ddp: DistributedDataParallel; fsdp: FSDP2 fully_shard "
        "(parameters, gradients and optimizer state sharded over the processes); workers start with torchrun",
        json_schema_extra=KEYED_WHEN_SET)
    nproc: int = Field(1, ge=1, le=1024, description="processes per node (torchrun --nproc-per-node): one per GPU, "
                       "or CPU processes", json_schema_extra=KEYED_WHEN_SET)
    nnodes: int = Field(1, ge=1, le=4096, description="nodes; above 1 every other node runs `jielong join` "
                        "(README: Training on several nodes)", json_schema_extra=KEYED_WHEN_SET)
    rdzv_endpoint: str | None = Field(None, description="host:port of the c10d rendezvous when nnodes > 1",
                                      json_schema_extra=NO_OUTPUT)
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto: nccl on CUDA, gloo on CPU",
                                                     json_schema_extra=KEYED_WHEN_SET)

    @model_validator(mode="after")
    def _processes_share_the_global_batch(self) -> "TrainConfig":
        world = self.nproc * self.nnodes
        if self.distributed != "none" and self.fused_loss == "on":
            raise ValueError("fused_loss: on needs the model's last hidden states, which the DDP and FSDP wrappers do "
                             "not hand out: use fused_loss auto or off with distributed training")
        if self.distributed == "none":
            if world != 1 or self.backend != "auto" or self.rdzv_endpoint:
                raise ValueError("distributed: none trains in this process alone: nproc, nnodes, backend and "
                                 "rdzv_endpoint apply to distributed: ddp or fsdp")
            return self
        if self.batch_size % world:
            raise ValueError(f"batch_size ({self.batch_size}) is the global batch, split evenly over nproc x nnodes = "
                             f"{world} processes: make it a multiple of {world}")
        if self.nnodes > 1 and not _is_endpoint(self.rdzv_endpoint):
            raise ValueError(f"nnodes = {self.nnodes} needs rdzv_endpoint: host:port of the c10d rendezvous, "
                             "reachable from every node (got {self.rdzv_endpoint!r})")
        if self.nnodes == 1 and self.rdzv_endpoint:
            raise ValueError("rdzv_endpoint is for nnodes > 1 (one node starts its own rendezvous)")
        return self


def _is_endpoint(value: str | None) -> bool:
    host, _, port = (value or "").rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


class LoraSettings(Strict):
    """Low-rank adapters (Hu et al., 2021) through peft: only the adapters train; they are merged into the
    weights at the end, so the saved model is a plain Hugging Face model like a fully fine-tuned one."""

    r: int = Field(16, ge=1, description="rank of each adapter")
    alpha: float = Field(32.0, gt=0, description="scale: the update is (alpha / r) B A")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names to adapt; all-linear: every linear layer but the output layer")
