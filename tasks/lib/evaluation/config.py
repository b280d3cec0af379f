"""The `evaluate` section of the run config: one sub-section per evaluation.

Defaults are sized so that evaluating one `tiny` model (~1.4 M parameters, context 256) on the
built-in corpus takes about half a minute on 2 CPU cores; every knob that trades time for precision
says so. Larger machines mostly want more `icl.max_examples`, a bigger `knnlm.max_train_tokens`
(None = the whole train split) and `knnlm.k: 1024` as in Khandelwal et al.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from jielong.tasks.core.schema import KEYED_WHEN_SET, Strict


class ExtraEvalSet(Strict):
    """More held-out text for perplexity: a file or folder of .parquet / .jsonl / .json / .txt files,
    or a `datasets.save_to_disk` folder. Reported as eval/<name>/perplexity, ... ."""

    name: str
    path: str
    text_field: str = "text"  # column/key holding the text (parquet, jsonl, json, datasets)
    text_unit: Literal["file", "paragraph", "line"] = "file"  # how .txt files split into documents
    max_documents: int | None = Field(None, ge=1)


class PerplexityConfig(Strict):
    """Token perplexity, bits per byte and word perplexity of held-out documents.

    Each document is scored on its own, after one end-of-text token (as lm-evaluation-harness's
    loglikelihood_rolling), in windows of `window` tokens that advance by `stride`: every token is
    predicted once, with at least window - stride tokens of context from the second window on.
    stride = window gives the disjoint windows of lm-evaluation-harness."""

    enabled: bool = True
    window: int | None = Field(None, ge=2, description="tokens per window; default: the model's context length")
    stride: int | None = Field(None, ge=1, description="default: window (disjoint windows)")
    batch_tokens: int = Field(16384, ge=256, description="padded tokens per forward pass")
    max_documents: int | None = Field(None, ge=1, description="score only the first N test documents")
    source_depth: int = Field(2, ge=1, description="group the `source` path by its first N components for the breakdown")
    validation: bool = Field(False, description="also score the validation split, reported as eval/validation/perplexity, "
                             "...: a second held-out set (the contamination study compares it with a leaked test split)",
                             json_schema_extra=KEYED_WHEN_SET)
    extra: list[ExtraEvalSet] = Field(default_factory=list)

    @model_validator(mode="after")
    def _set_names_unique(self) -> "PerplexityConfig":
        names = [extra.name for extra in self.extra] + (["validation"] if self.validation else [])
        if len(set(names)) != len(names):
            raise ValueError(f"evaluate.perplexity.extra: each set needs its own name (got {names}; "
                             "'validation' is taken when perplexity.validation is true)")
        return self


class CalibrationConfig(Strict):
    """Token-level calibration of the top next-token probability (from the perplexity pass), and
    answer-level calibration of every in-context task."""

    enabled: bool = True
    equal_mass_bins: int = Field(10, ge=1, description="HELM's ece_10_bin: bins of equal counts")
    equal_width_bins: int = Field(15, ge=1, description="torchmetrics' CalibrationError default")


class IclConfig(Strict):
    """In-context accuracy by log-likelihood of each choice (lm-evaluation-harness style), with
    demonstrations carrying gold labels, random labels or no labels (Min et al., 2022).

    k = 0 (no demonstrations) is scored once and is the first point of every mode's curve. For each
    seed, k demonstrations are the first k of a seeded shuffle of the task's demonstration pool (so
    k = 4 extends k = 1), shared by every scored example; when a prompt would not fit the context,
    trailing demonstrations are dropped for that example (the report gives the mean k used)."""

    enabled: bool = True
    tasks: list[str] = Field(
        default_factory=lambda: ["docstring_kind", "next_sentence"],
        description="task specs: a name in data/eval/ (NAME.yaml) or a path to a YAML/JSON spec",
    )
    shots: list[int] = Field(default_factory=lambda: [0, 1, 4, 8, 16])
    modes: list[Literal["gold", "random", "none"]] = Field(default_factory=lambda: ["gold", "random", "none"])
    num_seeds: int = Field(3, ge=1, description="demonstration draws per (mode, k); seeds are seed, seed+1, ...")
    max_examples: int | None = Field(50, ge=1, description="scored examples per task (a deterministic subset); ~0.1 s each for the tiny model")
    pack_tokens: int = Field(512, ge=64, description="most tokens per packed row: shared demonstrations + many examples (attention cost grows with its square)")
    batch_rows: int = Field(8, ge=1, description="packed rows per forward pass")
    leading_eos: bool = Field(True, description="start every prompt with an end-of-text token (a task spec's "
                              "leading_eos wins); false is lm-evaluation-harness's convention for models without a BOS token")

    @model_validator(mode="after")
    def _shots_valid(self) -> "IclConfig":
        if any(k < 0 for k in self.shots):
            raise ValueError("icl.shots must be >= 0")
        return self


class KnnLmConfig(Strict):
    """kNN-LM (Khandelwal et al., 2020): p = lambda * p_kNN + (1 - lambda) * p_LM, with
    p_kNN(w) = sum over the k nearest (key -> w) entries of softmax(-squared L2 distance / T).

    Keys are the hidden state at each train-split position, values the token that follows it.
    `key: ffn_input` (default, the paper's best) is the input of the last layer's feed-forward block,
    after its layer norm; `final` is the hidden state that feeds the output embedding (after the final
    norm). lambda and T are chosen on validation tokens and applied unchanged on test."""

    enabled: bool = True
    key: Literal["ffn_input", "final"] = "ffn_input"
    max_train_tokens: int | None = Field(150_000, ge=1, description="datastore size cap (None = whole train split); train documents are taken in a seeded shuffle")
    k: int = Field(32, ge=1, description="neighbours per query (the paper: 1024 on 100 M+ entries)")
    flat_threshold: int = Field(8192, ge=1, description="datastores up to this size use exact IndexFlatL2, larger ones IVF-PQ (exact search of 27 k test queries over 20 k keys already costs more than the forward pass here)")
    nlist: int = Field(256, ge=1, description="IVF cells (lowered automatically to size/39 for small datastores)")
    m: int = Field(32, ge=1, description="PQ sub-quantizers; must divide the key dimension (else the largest divisor below)")
    nbits: int = Field(4, ge=1, le=16, description="bits per PQ code; 4 = faiss IndexIVFPQFastScan (SIMD, ~10x faster search than 8-bit IndexIVFPQ here)")
    nprobe: int = Field(8, ge=1, description="IVF cells searched per query")
    train_sample: int = Field(32_768, ge=256, description="keys used to train IVF-PQ")
    recompute_distances: bool = Field(True, description="IVF-PQ: rescore candidates by exact distance to the stored keys (faiss IndexRefineFlat; keeps a float32 copy of the keys)")
    rerank: int = Field(4, ge=1, description="with recompute_distances: fetch k * rerank candidates by PQ distance, keep the k exactly nearest")
    lambdas: list[float] = Field(default_factory=lambda: [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7])
    temperatures: list[float] = Field(
        default_factory=lambda: [0.25, 0.5, 1.0, 2.0, 4.0, 8.0],
        description="T candidates, as multiples of the median nearest-neighbour squared distance on validation",
    )
    tune_max_tokens: int = Field(16384, ge=1, description="validation tokens used to choose lambda and T")
    sweep: list[float] = Field(default_factory=lambda: [0.1, 0.25, 0.5, 1.0], description="datastore fractions for the size sweep ([] = none)")
    batch_queries: int = Field(8192, ge=1, description="queries per faiss search call")

    @model_validator(mode="after")
    def _grids_valid(self) -> "KnnLmConfig":
        if not self.lambdas or any(not 0 <= x <= 1 for x in self.lambdas):
            raise ValueError("knnlm.lambdas must be a non-empty list of values in [0, 1]")
        if not self.temperatures or any(t <= 0 for t in self.temperatures):
            raise ValueError("knnlm.temperatures must be positive")
        if any(not 0 < f <= 1 for f in self.sweep):
            raise ValueError("knnlm.sweep fractions must be in (0, 1]")
        return self


class MemorizationConfig(Strict):
    """How much of each canary (ingest.canaries, tasks/lib/canaries.py) the model reproduces: greedy decoding
    from the document's first `prefix_tokens` tokens, compared token by token with its next
    `continuation_tokens` (Carlini et al., 2023: extraction from a prefix of the training data)."""

    enabled: bool = False
    prefix_tokens: int = Field(32, ge=1)
    continuation_tokens: int = Field(32, ge=1)


class EvaluateConfig(Strict):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto resolves with the device, as `device` does: bf16 autocast on CUDA, float32 on CPU (the numbers
    # differ within the tolerance bench/RESULTS.md measures). fp32 and bf16 name the arithmetic outright.
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA, float32 on CPU", json_schema_extra=KEYED_WHEN_SET)
    max_length: int | None = Field(None, ge=2, description="context length; default: the model's max_position_embeddings")
    perplexity: PerplexityConfig = Field(default_factory=PerplexityConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    icl: IclConfig = Field(default_factory=IclConfig)
    knnlm: KnnLmConfig = Field(default_factory=KnnLmConfig)
    memorization: MemorizationConfig = Field(MemorizationConfig(), json_schema_extra=KEYED_WHEN_SET)
