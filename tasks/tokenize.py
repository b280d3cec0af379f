"""tokenize: train the byte-level BPE tokenizer on the train split, then pack every split.

Output: tokenizer/ (a transformers tokenizer: `AutoTokenizer.from_pretrained`, with the chat template),
tokens/<split>.bin (uint16, or uint32 for vocabularies above 65,536: each document's ids followed by
<|endoftext|>, memory-mappable), and the token counts per split and the unigram entropy of the
train tokens (the loss a model that ignores context would reach) in the manifest.
With `model.init_from`, the checkpoint's own tokenizer is used instead of training one.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Iterator

import numpy as np

from pydantic import Field

from jielong.models.presets import PRESETS
from jielong.models.tokenizer import ensure_chat_tokens, load_tokenizer, train_tokenizer
from jielong.tasks.core.schema import Strict, UserError
from jielong.tasks.core.contract import Stage, StageContext, StageResult
from jielong.models.imports import import_model, source_fingerprint
from jielong.tasks.core.shards import read_rows



# ---------------------------------------------------------------- config section


class TokenizerConfig(Strict):
    """Byte-level BPE trained on the train split (ignored when model.init_from brings its own)."""

    vocab_size: int = Field(4096, ge=300, le=1_000_000)
    min_frequency: int = Field(2, ge=1)


VERSION = "2"  # 2: an init_from tokenizer with its own chat template keeps it (no jielong role tokens added)
SPLITS = ("train", "validation", "test")
ENCODE_BATCH = 1000


def iter_texts(files: list[Path]) -> Iterator[str]:
    for path in files:
        for row in read_rows(path, columns=["text"]):
            yield row["text"]


def encode_split(tokenizer, files: list[Path], out: Path, dtype: np.dtype) -> tuple[int, int, int, np.ndarray]:
    """Write ids + EOS per document, streaming ENCODE_BATCH documents at a time; returns (documents,
    tokens, characters, how often each token id occurs)."""
    eos = tokenizer.eos_token_id
    counts = np.zeros(len(tokenizer), dtype=np.int64)
    docs = chars = 0
    texts = iter_texts(files)
    with open(out, "wb") as handle:
        while batch := list(itertools.islice(texts, ENCODE_BATCH)):
            ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
            block = np.fromiter((t for doc in ids for t in (*doc, eos)), dtype=dtype)
            block.tofile(handle)
            counts += np.bincount(block, minlength=len(counts))
            docs += len(batch)
            chars += sum(map(len, batch))
    return docs, int(counts.sum()), chars, counts


def unigram_entropy(counts: np.ndarray) -> float:
    """Entropy (nats/token) of the unigram distribution given by token counts."""
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def run(ctx: StageContext) -> StageResult:
    from jielong.models.data import token_dtype  # models.data imports torch: only when the stage runs

    data = ctx.inputs["dedup"]
    model_cfg = ctx.section("model")
    context = model_cfg.context_length or PRESETS[model_cfg.preset]["context_length"]
    if model_cfg.init_from:
        tokenizer = load_tokenizer(import_model(model_cfg.init_from, ctx.workspace))
        ensure_chat_tokens(tokenizer)
    else:
        if not data.files("train"):
            raise UserError("tokenize: the dedup artifact has no training documents")
        tok_cfg = ctx.section("tokenizer")
        tokenizer = train_tokenizer(iter_texts(data.files("train")), tok_cfg.vocab_size, tok_cfg.min_frequency)
    tokenizer.save_pretrained(str(ctx.out_dir / "tokenizer"))
    dtype = token_dtype(len(tokenizer))
    (ctx.out_dir / "tokens").mkdir()
    result = StageResult()
    splits, counts = {}, {}
    for split in SPLITS:
        docs, tokens, chars, counts[split] = encode_split(tokenizer, data.files(split),
                                                          ctx.out_dir / "tokens" / f"{split}.bin", dtype)
        splits[split] = {"documents": docs, "tokens": tokens, "characters": chars}
        result.documents_in += docs
        result.documents_out += docs
        result.metrics[f"{split}_tokens"] = tokens
    entropy = unigram_entropy(counts["train"])
    result.metrics.update(
        vocab_size=len(tokenizer),
        unigram_entropy_nats=entropy,
        chars_per_token=splits["train"]["characters"] / max(splits["train"]["tokens"], 1),
    )
    result.details.update(splits=splits, dtype=dtype.name, context_length=context,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return result


def init_from_fingerprint(view) -> object:
    """The content of the model.init_from checkpoint (its tokenizer is used instead of training one)."""
    return source_fingerprint(view.model.init_from) if view.model.init_from else None


def reads(cfg) -> tuple[str, ...]:
    """A checkpoint's own tokenizer replaces training one (then no tokenizer setting is read); the preset
    is read only for its default context length."""
    model = ("model.init_from", "model.context_length") + (("model.preset",) if cfg.model.context_length is None else ())
    return model if cfg.model.init_from else ("tokenizer", *model)


STAGE = Stage(name="tokenize", version=VERSION, reads=reads, inputs=("dedup",), run=run,
              external=init_from_fingerprint)
