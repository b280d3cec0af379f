"""Fixtures for the evaluate tests: a tiny random Llama model with a byte-level BPE tokenizer, and
train/validation/test Parquet shards of real built-in corpus documents (docstrings of a few stdlib
modules). Everything is built locally in a temporary directory: nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import xxhash

EOS, PAD = "<|endoftext|>", "<|pad|>"
MODULES = [
    "json/__init__.py", "json/decoder.py", "json/encoder.py", "textwrap.py", "shlex.py", "fractions.py",
    "statistics.py", "string.py", "bisect.py", "heapq.py", "difflib.py", "fnmatch.py", "glob.py", "calendar.py",
    "queue.py", "sched.py", "colorsys.py", "base64.py", "csv.py", "copy.py", "operator.py", "enum.py",
    "dataclasses.py", "functools.py", "contextlib.py", "ipaddress.py", "argparse.py", "pprint.py",
]


def corpus_documents() -> list[dict]:
    from jielong.tasks.lib.sources.builtin_corpus import docstring_documents

    docs = []
    for rel in MODULES:
        found, _ = docstring_documents(rel)
        docs += [{"id": i, "text": t, "source": s} for i, t, s in found]
    return docs


def split_of(doc_id: str) -> str:
    bucket = xxhash.xxh3_64_intdigest(doc_id.encode()) % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def write_splits(root: Path, docs: list[dict]) -> dict[str, list[Path]]:
    out = {}
    for split in ("train", "validation", "test"):
        rows = [d for d in docs if split_of(d["id"]) == split]
        path = root / split / "part-00000.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), path)
        out[split] = [path]
    return out


def build_tiny_model(directory: Path, texts: list[str], vocab_size: int = 768, seed: int = 0,
                     context: int = 256) -> Path:
    """A random 2-layer Llama (hidden 64) and a byte-level BPE tokenizer trained on `texts`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, bos_token=EOS, pad_token=PAD,
                                        model_max_length=context)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=context, tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def eval_corpus(tmp_path_factory) -> dict[str, list[Path]]:
    return write_splits(tmp_path_factory.mktemp("eval_corpus"), corpus_documents())


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    texts = [d["text"] for d in corpus_documents()]
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"), texts)
