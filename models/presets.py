"""Model presets: Llama-style causal LMs (RoPE, RMSNorm, SwiGLU, SDPA attention) as transformers configs.

    tiny   ~1.4 M parameters (vocab 4096): the 2-core CPU default, ~minutes to train
    small  ~7 M parameters (vocab 8192): a laptop / single GPU
    base   ~45 M parameters (vocab 16384, context 1024): one GPU

The vocabulary size comes from the trained tokenizer; the preset's `vocab_size` is the default the
tokenizer is trained to.
"""

from __future__ import annotations

from pathlib import Path

PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                 context_length=256, vocab_size=4096),
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8,
                  context_length=256, vocab_size=8192),
    "base": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                 context_length=1024, vocab_size=16384),
}


def model_config(preset: str, vocab_size: int, bos_id: int, eos_id: int, pad_id: int, context_length: int | None = None,
                 shape: dict[str, int] | None = None):
    """The preset's transformers config; `shape` replaces some of its dimensions (ModelConfig.shape_overrides)."""
    from transformers import LlamaConfig

    spec = {**PRESETS[preset], **(shape or {})}
    ctx = context_length or spec.pop("context_length")
    spec.pop("context_length", None)
    spec.pop("vocab_size")
    return LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=ctx,
        num_key_value_heads=spec["num_attention_heads"],
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        attention_dropout=0.0,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        **spec,
    )


def build_model(config, seed: int):
    """A freshly initialised model; the seed fixes the initial weights."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def load_model(path: str | Path):
    """A local Hugging Face checkpoint: safetensors only, never remote code, never the network."""
    import torch
    from transformers import AutoModelForCausalLM

    # float32 weights whatever the checkpoint's dtype: they are the master weights of training
    def load(attention: str):
        return AutoModelForCausalLM.from_pretrained(
            str(path), local_files_only=True, use_safetensors=True, trust_remote_code=False,
            attn_implementation=attention, dtype=torch.float32,
        )

    try:
        return load("sdpa")
    except ValueError as error:
        # an architecture SDPA cannot compute exactly (Gemma 2's attention-logit soft-capping) refuses it
        if "scaled_dot_product_attention" not in str(error):
            raise
        return load("eager")


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
