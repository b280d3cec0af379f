"""The one typed configuration of a jielong run.

A run's config is a YAML preset from configs/ (or any YAML path), then ``--set section.key=value``
overrides, validated by the pydantic schema below. Unknown keys and wrong types fail at once with a
message naming the key and the closest valid keys.

A stage sees only the settings it declares (`Stage.reads`, see tasks/core/contract.py) and its cache key
is computed from exactly those, so changing ``dedup.threshold`` changes the dedup key (and its
downstream stages' keys) and nothing upstream. Settings marked NO_OUTPUT (tasks/core/schema.py) stay out
of every key.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from jielong.tasks.lib.evaluation.config import EvaluateConfig
from jielong.tasks.core.resources import shipped_dir
from jielong.tasks.core.schema import KEYED_WHEN_SET, NO_OUTPUT, Strict, UserError
from jielong.tasks.lib.sources import BuiltinSource, FilesSource, HFSource, Source# noqa: F401  (re-exported)

CONFIG_DIR = shipped_dir("configs")


class ConfigError(UserError):
    """A user mistake in a config file or an override; the message says what to fix."""


# ---------------------------------------------------------------- runtime


class RunnerConfig(Strict):
    """How shard tasks run: `process` uses a Prefect ProcessPoolTaskRunner (`workers` processes),
    `thread` a ThreadPoolTaskRunner, `dask` prefect-dask's DaskTaskRunner (pip install 'jielong[dask]'):
    a local cluster of `workers` processes, or the cluster whose scheduler is at `dask_address`
    (flows/dask_runner.py says what its workers need)."""

    kind: Literal["process", "thread", "dask"] = "process"
    workers: int = Field(2, ge=1, le=256)
    dask_address: str | None = None  # connect to an existing Dask cluster instead of a local one


class MlflowConfig(Strict):
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///<workspace>/mlflow.db
    experiment: str = "jielong"
    samples: int = Field(20, ge=0, description="kept/rejected documents logged per stage")
    retry_seconds: float = Field(
        300, ge=0, description="how long a failing tracking call is retried (with backoff) before the run stops; "
        "stage outputs are kept, so a rerun logs them as cache hits")


# ---------------------------------------------------------------- ingest


class CanaryConfig(Strict):
    """Documents of the sources held out and put back `repeats` times (tasks/lib/canaries.py): what
    evaluate.memorization measures. Each repeat count gets about the same number of canaries."""

    repeats: list[int] = Field(default_factory=lambda: [0, 1, 2, 4, 8, 16, 32],
                               description="repeat counts drawn from; 0 is a never-seen control (test split)")
    fraction: float = Field(0.01, gt=0, le=0.5, description="of the documents of min_chars to max_chars chosen")
    min_chars: int = Field(1000, ge=1, description="shorter documents are never canaries (too few tokens to "
                           "measure a prefix and its continuation)")
    max_chars: int = Field(5000, ge=1)
    salt: str = "jielong-canaries-v1"

    @model_validator(mode="after")
    def _sensible(self) -> "CanaryConfig":
        if not self.repeats or any(r < 0 or r > 1000 for r in self.repeats) or len(set(self.repeats)) != len(self.repeats):
            raise ValueError("ingest.canaries.repeats: distinct counts from 0 to 1000")
        if self.min_chars > self.max_chars:
            raise ValueError("ingest.canaries: min_chars is above max_chars")
        return self


class IngestConfig(Strict):
    sources: list[Source] = Field(default_factory=lambda: [BuiltinSource()], min_length=1)
    canaries: CanaryConfig | None = Field(None, description="inject canaries (the dedup-memorization study)",
                                          json_schema_extra=KEYED_WHEN_SET)
    # the Parquet shards of every data stage (ingest, clean, dedup) close at whichever limit comes first
    shard_size: int = Field(2000, ge=1, description="documents per output Parquet shard")
    shard_bytes: int = Field(32_000_000, ge=1_000, description="bytes of text per output Parquet shard")
    # also the size of the byte ranges (row groups for Parquet) a larger file is split into, so one big
    # file spreads over workers; documents and ids do not depend on it, the shard layout of the output does
    job_bytes: int = Field(64 * 2**20, ge=1, description="input bytes per ingest task: small files grouped, "
                           "a large JSON-lines, line/paragraph text or Parquet file split into ranges of about this size")
    max_document_chars: int = Field(1_000_000, ge=1, description="longer documents are rejected")
    decode_errors: Literal["replace", "reject"] = "replace"  # invalid UTF-8 in a document


# ---------------------------------------------------------------- clean


class NormalizeConfig(Strict):
    fix_mojibake: bool = True  # ftfy, configured not to touch quotes, entities or code
    form: Literal["NFC", "NFKC", "none"] = "NFC"


class HtmlConfig(Strict):
    # auto: extract documents ingested from .html/.htm files or that start like an HTML page
    mode: Literal["auto", "always", "never"] = "auto"


class HarmfulConfig(Strict):
    enabled: bool = True
    languages: list[str] = Field(default_factory=lambda: ["en"])
    max_matches: int = Field(0, ge=0, description="reject when more blocklisted words than this")
    allow_words: list[str] = Field(default_factory=list, description="list entries not to count, e.g. 'xxx' in code")

    @model_validator(mode="after")
    def _lists_exist(self) -> "HarmfulConfig":
        from importlib import resources

        base = resources.files("badwords") / "resource" / "words"
        missing = [lang for lang in self.languages if not (base / f"{lang}.txt").is_file()]
        if missing:
            available = sorted(p.name[:-4] for p in base.iterdir() if p.name.endswith(".txt"))
            raise ValueError(f"no word list for {', '.join(map(repr, missing))}; available: {', '.join(available)}")
        return self


class GopherQualityConfig(Strict):
    """Rae et al. 2021 (Gopher), quality rules. Defaults are the published values (configs/web.yaml);
    every threshold can be set to null to switch that one rule off."""

    enabled: bool = True
    min_words: int | None = 50
    max_words: int | None = 100_000
    min_avg_word_length: float | None = 3
    max_avg_word_length: float | None = 10
    max_symbol_word_ratio: float | None = 0.1
    max_bullet_lines_ratio: float | None = 0.9
    max_ellipsis_lines_ratio: float | None = 0.3
    min_alpha_words_ratio: float | None = 0.8
    min_stop_words: int | None = 2


class GopherRepetitionConfig(Strict):
    enabled: bool = True
    max_dup_line_ratio: float | None = 0.3
    max_dup_para_ratio: float | None = 0.3
    max_dup_line_char_ratio: float | None = 0.2
    max_dup_para_char_ratio: float | None = 0.2
    max_top_ngram_char_ratio: dict[int, float] | None = Field(default_factory=lambda: {2: 0.2, 3: 0.18, 4: 0.16})
    max_dup_ngram_char_ratio: dict[int, float] | None = Field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    )


class C4Config(Strict):
    """Raffel et al. 2020 (C4). `filter_lines` removes lines (it edits documents) before the checks."""

    enabled: bool = True
    filter_lines: bool = True  # drop lines without terminal punctuation, < min_line_words, "javascript"
    min_line_words: int | None = 3
    min_sentences: int | None = 5
    reject_lorem_ipsum: bool = True
    reject_curly_brace: bool = True
    reject_javascript_lines: bool = True  # only with filter_lines


class FineWebConfig(Strict):
    """Penedo et al. 2024 (FineWeb) extra quality rules."""

    enabled: bool = True
    min_line_punct_ratio: float | None = 0.12
    max_short_line_ratio: float | None = 0.67
    short_line_chars: int = 30
    max_dup_line_char_ratio: float | None = 0.01
    max_newline_word_ratio: float | None = 0.3


class CleanConfig(Strict):
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig)
    html: HtmlConfig = Field(default_factory=HtmlConfig)
    harmful: HarmfulConfig = Field(default_factory=HarmfulConfig)
    gopher_quality: GopherQualityConfig = Field(default_factory=GopherQualityConfig)
    gopher_repetition: GopherRepetitionConfig = Field(default_factory=GopherRepetitionConfig)
    c4: C4Config = Field(default_factory=C4Config)
    fineweb: FineWebConfig = Field(default_factory=FineWebConfig)


# ---------------------------------------------------------------- dedup + split


class NearDedupConfig(Strict):
    enabled: bool = True
    ngram: int = Field(5, ge=1, description="word n-gram shingles")
    num_perm: int = Field(128, ge=8)
    bands: int = Field(16, ge=1)
    threshold: float = Field(0.8, gt=0, le=1, description="exact Jaccard a candidate pair must reach")
    seed: int = 42

    @model_validator(mode="after")
    def _bands_divide_perms(self) -> "NearDedupConfig":
        if self.num_perm % self.bands:
            raise ValueError(f"bands ({self.bands}) must divide num_perm ({self.num_perm})")
        return self


class DecontaminateConfig(Strict):
    enabled: bool = True
    ngram: int = Field(13, ge=1)
    extra_eval_paths: list[str] = Field(default_factory=list, description="more eval texts to protect")


class DedupConfig(Strict):
    exact: bool = True
    near: NearDedupConfig = Field(default_factory=NearDedupConfig)
    decontaminate: DecontaminateConfig = Field(default_factory=DecontaminateConfig)

    # `--set dedup.threshold=0.7` is the documented shorthand for dedup.near.threshold
    @model_validator(mode="before")
    @classmethod
    def _threshold_shorthand(cls, data: Any) -> Any:
        if isinstance(data, dict) and "threshold" in data:
            data = dict(data)
            near = dict(data.get("near") or {})
            near["threshold"] = data.pop("threshold")
            data["near"] = near
        return data


class SplitConfig(Strict):
    """Document-level split by a hash of the id: stable when documents are added or removed."""

    validation: float = Field(0.05, ge=0, lt=1)
    test: float = Field(0.05, ge=0, lt=1)
    salt: str = "jielong-split-v1"
    leak_test: int = Field(0, ge=0, le=100, description="a deliberate contamination, for the contamination study: "
                           "every test document is also written into train this many times (after decontamination, "
                           "which would catch it); 0: never", json_schema_extra=KEYED_WHEN_SET)

    @model_validator(mode="after")
    def _leaves_training_data(self) -> "SplitConfig":
        if self.validation + self.test >= 1:
            raise ValueError("validation + test must be below 1")
        return self


# ---------------------------------------------------------------- model stages


class TokenizerConfig(Strict):
    """Byte-level BPE trained on the train split (ignored when model.init_from brings its own)."""

    vocab_size: int = Field(4096, ge=300, le=1_000_000)
    min_frequency: int = Field(2, ge=1)


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


class PretrainConfig(TrainConfig):
    register_as: str | None = Field("jielong-pretrain", description="MLflow registered model name (null: do not register)",
                                    json_schema_extra=NO_OUTPUT)
    flops_budget: float | None = Field(None, gt=0, description="train for the steps this compute allows, C = 6·N·D "
                                       "(models/flops.py), instead of `steps`", json_schema_extra=KEYED_WHEN_SET)

    @model_validator(mode="after")
    def _budget_sets_the_steps(self) -> "PretrainConfig":
        # with a budget, `steps` cannot change the model: a changed one would only move the key
        default = type(self).model_fields["steps"].default
        if self.flops_budget is not None and self.steps != default:
            raise ValueError(f"pretrain.flops_budget sets the number of steps, so pretrain.steps cannot change the "
                             f"model: leave it at its default ({default}), e.g. --set pretrain.steps={default}")
        return self


class InstructSource(Strict):
    """builtin: pairs derived from the built-in corpus documents (train split -> training pairs,
    validation/test -> held-out pairs); alpaca: JSON/JSONL with instruction, input, output;
    chat: JSONL with `messages` [{role, content}]."""

    kind: Literal["builtin", "alpaca", "chat"] = "builtin"
    path: str | None = None
    limit: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _path_for_files(self) -> "InstructSource":
        if self.kind != "builtin" and not self.path:
            raise ValueError(f"an instruct source of kind {self.kind!r} needs a path")
        return self


class LoraSettings(Strict):
    """Low-rank adapters (Hu et al., 2021) through peft: only the adapters train; they are merged into the
    weights at the end, so the saved model is a plain Hugging Face model like a fully fine-tuned one."""

    r: int = Field(16, ge=1, description="rank of each adapter")
    alpha: float = Field(32.0, gt=0, description="scale: the update is (alpha / r) B A")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names to adapt; all-linear: every linear layer but the output layer")


class InstructConfig(TrainConfig):
    sources: list[InstructSource] = Field(default_factory=lambda: [InstructSource()], min_length=1)
    heldout_fraction: float = Field(0.1, ge=0, lt=1, description="of alpaca/chat records, by hash")
    max_length: int = Field(256, ge=16, description="prompt + response tokens; longer pairs are truncated")
    generations: int = Field(8, ge=0, description="held-out prompts generated before/after, logged as a table")
    max_new_tokens: int = Field(48, ge=1)
    choice_examples: int = Field(100, ge=0, description="held-out prompts scored as a multiple choice among replies, "
                                 "before and after tuning (0: none)")
    choice_candidates: int = Field(4, ge=2, description="replies per choice: the prompt's own and the next prompts'")
    steps: int = Field(120, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(10, ge=0)
    eval_every: int = Field(40, ge=1)
    checkpoint_every: int = Field(60, ge=1, json_schema_extra=NO_OUTPUT)
    register_as: str | None = Field("jielong-instruct", json_schema_extra=NO_OUTPUT)
    lora: LoraSettings | None = Field(None, description="null: full fine-tuning; else LoRA with these settings")

    @model_validator(mode="after")
    def _lora_in_one_process(self) -> "InstructConfig":
        if self.lora is not None and self.distributed != "none":
            raise ValueError("instruct.lora trains in one process: torchrun workers load plain weights, so set "
                             "instruct.distributed=none (or drop instruct.lora for ddp/fsdp)")
        return self


# ---------------------------------------------------------------- the whole run


class PipelineConfig(Strict):
    name: str = "tiny"
    workspace: str = "data"
    seed: int = 1234
    runner: RunnerConfig = Field(default_factory=RunnerConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    clean: CleanConfig = Field(default_factory=CleanConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    instruct: InstructConfig = Field(default_factory=InstructConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    def section(self, name: str) -> Any:
        return getattr(self, name)

    def workspace_path(self) -> Path:
        return Path(self.workspace).expanduser().resolve()

    def config_hash(self) -> str:
        return canonical_hash(self.model_dump(mode="json", exclude={"workspace", "runner", "mlflow"}))


# ---------------------------------------------------------------- loading


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def canonical_hash(value: Any, length: int = 16) -> str:
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()[:length]


def available_presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_config(name_or_path: str = "tiny", overrides: list[str] | None = None) -> PipelineConfig:
    """Load a preset (name in configs/ or a YAML path), apply `key.path=value` overrides, validate."""
    raw = _read_yaml(name_or_path)
    for override in overrides or []:
        _apply_override(raw, override)
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_explain(err, raw)) from None


def _read_yaml(name_or_path: str) -> dict:
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"config {name_or_path!r} not found: give a preset name ({', '.join(available_presets())}) "
            "or a path to a YAML file"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections, got {type(data).__name__}")
    data.setdefault("name", path.stem)
    return data


def _apply_override(raw: dict, override: str) -> None:
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {override!r} must look like section.key=value")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    parts = key.split(".")
    _check_path(parts)
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _check_path(parts: list[str]) -> None:
    """Fail early, with suggestions, on an override naming a key the schema does not have."""
    model: type[BaseModel] | None = PipelineConfig
    for depth, part in enumerate(parts):
        if model is None:
            return  # below a dict/list/union field: pydantic validates the value itself
        fields = dict(model.model_fields)
        if model is DedupConfig:
            fields["threshold"] = None
        if part not in fields:
            where = ".".join(parts[:depth]) or "the top level"
            raise ConfigError(_unknown_key_message(".".join(parts[: depth + 1]), part, list(fields), where))
        info = fields[part]
        annotation = getattr(info, "annotation", None)
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _unknown_key_message(full_key: str, part: str, valid: list[str], where: str) -> str:
    close = difflib.get_close_matches(part, valid, n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return f"unknown config key {full_key!r}.{hint} Valid keys in {where}: {', '.join(sorted(valid))}"


def _explain(err: ValidationError, raw: dict) -> str:
    lines = []
    for problem in err.errors():
        loc = [str(p) for p in problem["loc"]]
        key = ".".join(loc)
        if problem["type"] == "extra_forbidden":
            lines.append(_unknown_key_message(key, loc[-1], _valid_keys_at(loc[:-1]), ".".join(loc[:-1]) or "the top level"))
        else:
            got = problem.get("input")
            shown = f" (got {got!r})" if not isinstance(got, (dict, list)) else ""
            lines.append(f"{key}: {problem['msg']}{shown}")
    return "invalid config:\n  " + "\n  ".join(lines)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold: X, list[X], Annotated[Union[X, Y], ...], X | None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _valid_keys_at(loc: list[str]) -> list[str]:
    models: list[type[BaseModel]] = [PipelineConfig]
    for part in loc:
        if part.isdigit():
            continue  # an index into a list: same models
        tagged = [m for m in models if "kind" in m.model_fields and m.model_fields["kind"].default == part]
        if tagged:  # pydantic puts the discriminator value of a union member in the location
            models = tagged
            continue
        infos = [m.model_fields[part] for m in models if part in m.model_fields]
        models = [m for info in infos for m in _models_in(info.annotation)]
        if not models:
            return []
    return sorted({key for m in models for key in m.model_fields})
