"""The one typed configuration of a jielong run: the run-level sections (tasks/core/config.py) and
one section per stage, each defined by the module that reads it:

    ingest                  tasks/ingest.py           clean      tasks/clean.py
    dedup, split            tasks/dedup.py            tokenizer  tasks/tokenize.py
    model (and training)    models/config.py          pretrain   tasks/pretrain.py
    instruct                tasks/instruct.py         evaluate   tasks/lib/evaluation/config.py

``load_config("tiny", ["dedup.threshold=0.7"])`` reads configs/tiny.yaml, applies the overrides and
validates; a mistake is a ConfigError naming the key and the closest valid ones.
"""

from __future__ import annotations

from pydantic import Field

from jielong.models.config import LoraSettings, ModelConfig, TrainConfig  # noqa: F401  (re-exported)
from jielong.tasks.clean import CleanConfig
from jielong.tasks.core.config import (CONFIG_DIR, ConfigError, MlflowConfig, RunConfig, RunnerConfig,  # noqa: F401
                                       available_presets, canonical_hash, canonical_json, load)
from jielong.tasks.core.schema import UserError  # noqa: F401  (re-exported)
from jielong.tasks.dedup import DedupConfig, SplitConfig
from jielong.tasks.ingest import CanaryConfig, IngestConfig  # noqa: F401
from jielong.tasks.instruct import InstructConfig, InstructSource  # noqa: F401
from jielong.tasks.lib.evaluation.config import EvaluateConfig
from jielong.tasks.lib.sources import BuiltinSource, FilesSource, HFSource, Source  # noqa: F401  (re-exported)
from jielong.tasks.pretrain import PretrainConfig
from jielong.tasks.tokenize import TokenizerConfig


class PipelineConfig(RunConfig):
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    clean: CleanConfig = Field(default_factory=CleanConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    instruct: InstructConfig = Field(default_factory=InstructConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)


def load_config(name_or_path: str = "tiny", overrides: list[str] | None = None) -> PipelineConfig:
    """Load a preset (name in configs/ or a YAML path), apply `key.path=value` overrides, validate."""
    return load(PipelineConfig, name_or_path, overrides)
