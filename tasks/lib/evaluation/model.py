"""Loading a local Hugging Face causal LM for evaluation, and the batched forward passes every
evaluation shares.

Safetensors only, never remote code, never the network. Device "auto" is CUDA when available (with
bf16 autocast) else CPU (fp32); precision fp32 or bf16 names the arithmetic outright. SDPA attention: the in-context engine passes its own 4-D boolean
masks (shared demonstrations, one branch per answer), which transformers hands to SDPA unchanged.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    max_length: int
    eos_id: int
    prefix_id: int  # what a document's first token is predicted from: BOS, else EOS (lm-evaluation-harness's rule)
    autocast: torch.dtype | None  # bf16 on CUDA, None (fp32) on CPU

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids without special tokens; no length warning (we window long documents ourselves)."""
        if not texts:
            return []
        return [enc.ids for enc in self.tokenizer.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def autocast_context(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """bf16 autocast for precision bf16, and for auto on CUDA; None (float32) otherwise."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def load(model_dir: Path | str, device: str = "auto", max_length: int | None = None,
         precision: str = "auto") -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), local_files_only=True, use_safetensors=True, trust_remote_code=False,
        attn_implementation="sdpa", dtype=torch.float32,
    )
    model.to(dev).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{model_dir}: the tokenizer has no eos_token (needed between documents)")
    context = max_length or getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
    return LoadedModel(
        model=model, tokenizer=tokenizer, device=dev, max_length=int(context), eos_id=int(tokenizer.eos_token_id),
        prefix_id=int(tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id),
        autocast=autocast_dtype(dev, precision),
    )


def ffn_input_module(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose *input* is the "ffn_input" kNN-LM key: the last feed-forward block (the "final"
    key is the decoder's output, which the scorer has anyway)."""
    mlps = [module for name, module in model.named_modules() if name.split(".")[-1] in ("mlp", "feed_forward", "ffn")]
    if not mlps:
        raise ValueError("no feed-forward block named mlp/feed_forward/ffn in this model: use knnlm.key=final")
    return mlps[-1]  # modules are registered layer by layer: the last one is the last layer's


@contextlib.contextmanager
def capture_input(module: torch.nn.Module | None) -> Iterator[list[torch.Tensor]]:
    """Collects the first positional input of `module` on every forward (nothing when module is None)."""
    captured: list[torch.Tensor] = []
    if module is None:
        yield captured
        return
    handle = module.register_forward_pre_hook(lambda _mod, args: captured.append(args[0].detach()))
    try:
        yield captured
    finally:
        handle.remove()


def final_hidden(lm: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The decoder's last hidden states (B, L, d), without computing logits for every position."""
    with torch.inference_mode(), lm.autocast_context():
        out = lm.model.get_decoder()(
            input_ids=input_ids.to(lm.device), attention_mask=attention_mask.to(lm.device),
            position_ids=None if position_ids is None else position_ids.to(lm.device), use_cache=False,
        )
    return out.last_hidden_state


def head_logits(lm: LoadedModel, hidden: torch.Tensor) -> torch.Tensor:
    """Float32 logits of selected final hidden states (N, d), as the model's own head computes them."""
    with torch.inference_mode(), lm.autocast_context():
        logits = lm.model.get_output_embeddings()(hidden).float()
    cap = getattr(lm.model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    scale = getattr(lm.model.config, "logit_scale", None)
    if isinstance(scale, (int, float)) and scale != 1:
        logits = logits * scale
    return logits
