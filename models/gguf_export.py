"""A Hugging Face Llama folder as a GGUF file, in the layout llama.cpp's own converter writes.

    llama.*                 hyperparameters (context, widths, heads, RoPE base, RMSNorm epsilon)
    tokenizer.ggml.*        the byte-level BPE vocabulary ("gpt2"), merges, token types, special ids,
                            and the chat template
    token_embd, blk.N.*     weights; attn_q/attn_k rows permuted to llama.cpp's rotary layout
    output_norm, output     (no output.weight when the embeddings are tied: readers reuse token_embd)

Types: f32 (everything float32), f16 (matrices float16, norms float32), q8_0 (matrices quantized to
8-bit blocks of 32 by the `gguf` package, norms float32). A model this layout cannot express (another
architecture, biases, scaled RoPE, a non-byte-level tokenizer) is an ExportError naming why.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jielong.tasks.core.schema import UserError

GGUF_TYPES = ("f32", "f16", "q8_0")
# HF parameter name inside a decoder layer -> GGUF tensor name inside blk.N
LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


class ExportError(UserError):
    """A model the chosen format cannot express, or an export that failed its parity check."""


def permute_rotary(weights: np.ndarray, heads: int) -> np.ndarray:
    """HF's rotate-half q/k rows -> llama.cpp's interleaved pairs (what its converter does before writing)."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def check_architecture(config) -> None:
    """Refuse a model this GGUF layout cannot express, before anything is written."""
    arch = (config.architectures or ["?"])[0]
    if config.model_type != "llama" or arch != "LlamaForCausalLM":
        raise ExportError(f"GGUF export writes Llama models only; this model is {arch} ({config.model_type})")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ExportError("GGUF export: this Llama has attention or MLP biases, which the llama layout written here has not")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ExportError(f"GGUF export: scaled RoPE ({rope.get('rope_type') or rope.get('type')}) is not written")


def check_tokenizer(tokenizer_json: dict) -> None:
    if tokenizer_json.get("model", {}).get("type") != "BPE" or pre_tokenizer_name(tokenizer_json) is None:
        raise ExportError("GGUF export needs a byte-level BPE tokenizer (GPT-2 style, tokenizer.json); this model's is "
                          f"{tokenizer_json.get('model', {}).get('type')} with pre-tokenizer "
                          f"{(tokenizer_json.get('pre_tokenizer') or {}).get('type')}")
    if tokenizer_json.get("normalizer"):
        raise ExportError("GGUF export: the tokenizer has a normalizer, which a byte-level GGUF vocabulary cannot state")


def pre_tokenizer_name(tokenizer_json: dict) -> str | None:
    """llama.cpp's name for how the tokenizer splits text: "gpt-2" for plain byte-level with GPT-2's
    regex (llama.cpp refuses "gpt2" here, the name of the tokenizer model), or the name of a known split
    regex; None when it has no name."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    steps = pre.get("pretokenizers") or []
    if pre.get("type") == "Sequence" and len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel":
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

        regex = (steps[0].get("pattern") or {}).get("Regex")
        return next((name for name, split in GGUF_PRE_TOKENIZER_SPLITS.items() if split == regex), None)
    return None


def vocabulary(tokenizer_json: dict, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens in id order, their GGUF types and the merges ("a b"); ids the model has beyond the
    tokenizer's are padding tokens marked unused, as llama.cpp's converter does."""
    from gguf import TokenType

    tokens = {token: index for token, index in tokenizer_json["model"]["vocab"].items()}
    types = {}
    for added in tokenizer_json.get("added_tokens", []):
        tokens[added["content"]] = added["id"]
        types[added["id"]] = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
    by_id = {index: token for token, index in tokens.items()}
    if max(by_id) >= vocab_size:
        raise ExportError(f"GGUF export: the tokenizer has ids up to {max(by_id)} but the model only {vocab_size} embeddings")
    names, kinds = [], []
    for index in range(vocab_size):
        names.append(by_id.get(index, f"[PAD{index}]"))
        kinds.append(int(types.get(index, TokenType.NORMAL if index in by_id else TokenType.UNUSED)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer_json["model"].get("merges", [])]
    return names, kinds, merges


def write_gguf(model_dir: Path, out: Path, dtype: str = "f32", name: str | None = None) -> dict:
    """Write `out` (the caller makes it atomic); returns what was written, for the manifest."""
    import gguf
    from transformers import AutoConfig, AutoTokenizer

    if dtype not in GGUF_TYPES:
        raise ExportError(f"GGUF type {dtype!r} is not one of {', '.join(GGUF_TYPES)}")
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    check_architecture(config)
    tokenizer_file = Path(model_dir) / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ExportError(f"GGUF export needs the model's tokenizer.json (a fast tokenizer); {model_dir} has none")
    tokenizer_json = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    check_tokenizer(tokenizer_json)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    weights = load_weights(model_dir)
    writer = gguf.GGUFWriter(str(out), "llama")
    write_hyperparameters(writer, config, name or Path(model_dir).name, dtype)
    write_tokenizer(writer, tokenizer_json, tokenizer, config)
    counts = write_tensors(writer, config, weights, dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"gguf_type": dtype, "architecture": "llama", "tokenizer_pre": pre_tokenizer_name(tokenizer_json),
            "chat_template": tokenizer.chat_template is not None, "tensors": counts}


def load_weights(model_dir: Path) -> dict[str, np.ndarray]:
    """Every safetensors weight as float32 (read through torch: numpy has no bfloat16)."""
    from safetensors.torch import load_file

    weights = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        weights.update(load_file(file))
    return {name: value.float().numpy() for name, value in weights.items()}


def write_hyperparameters(writer, config, name: str, dtype: str) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    if dtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def write_tokenizer(writer, tokenizer_json: dict, tokenizer, config) -> None:
    names, kinds, merges = vocabulary(tokenizer_json, config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer_json))
    writer.add_token_list(names)
    writer.add_token_types(kinds)
    writer.add_token_merges(merges)
    for token, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{token}_token_id")
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(False)  # jielong never prepends BOS (prompts are tokenized without special tokens)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def write_tensors(writer, config, weights: dict[str, np.ndarray], dtype: str) -> dict[str, int]:
    """Every weight under its GGUF name; returns how many tensors of each GGUF type were written."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    named = {"token_embd.weight": weights.pop("model.embed_tokens.weight"),
             "output_norm.weight": weights.pop("model.norm.weight")}
    lm_head = weights.pop("lm_head.weight", None)
    if lm_head is not None and not config.tie_word_embeddings:
        named["output.weight"] = lm_head
    for layer in range(config.num_hidden_layers):
        for hf_name, gguf_name in LAYER_TENSORS.items():
            value = weights.pop(f"model.layers.{layer}.{hf_name}")
            if gguf_name == "attn_q.weight":
                value = permute_rotary(value, heads)
            elif gguf_name == "attn_k.weight":
                value = permute_rotary(value, kv_heads)
            named[f"blk.{layer}.{gguf_name}"] = value
    leftover = sorted(k for k in weights if not k.endswith("rotary_emb.inv_freq"))
    if leftover:
        raise ExportError(f"GGUF export: weights the llama layout has no place for: {', '.join(leftover[:5])}")
    counts: dict[str, int] = {}
    for name, value in named.items():
        kind = add_tensor(writer, name, value, dtype)
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def add_tensor(writer, name: str, value: np.ndarray, dtype: str) -> str:
    import gguf
    from gguf import GGMLQuantizationType as Q

    if value.ndim == 1 or dtype == "f32":  # norms stay float32 in every type, as llama.cpp's converter keeps them
        writer.add_tensor(name, np.ascontiguousarray(value, dtype=np.float32))
        return "F32"
    if dtype == "f16":
        writer.add_tensor(name, value.astype(np.float16))
        return "F16"
    block = gguf.GGML_QUANT_SIZES[Q.Q8_0][0]
    if value.shape[-1] % block:
        raise ExportError(f"GGUF q8_0: {name} has rows of {value.shape[-1]} values, not a multiple of {block}; use f16 or f32")
    writer.add_tensor(name, gguf.quants.quantize(value, Q.Q8_0), raw_dtype=Q.Q8_0)
    return "Q8_0"
