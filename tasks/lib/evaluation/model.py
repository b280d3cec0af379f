"""Loading a local Hugging Face causal LM for evaluation, and the batched forward passes every
evaluation shares.

Safetensors only, never remote code, never the network. Device "auto" is CUDA when available (with
bf16 autocast) else CPU (fp32); precision fp32 or bf16 names the arithmetic outright. SDPA attention
where the architecture has it (else eager). The scorers pass their own 4-D masks (packed windows, shared
demonstrations with one branch per answer), which transformers hands to the attention unchanged: so
`layer_masks` builds what each kind of layer needs itself, a sliding-window layer's window included
(Mistral, Phi-3, Gemma 2/3, Qwen2 with use_sliding_window), an additive float mask for eager attention.
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
    from transformers import AutoTokenizer

    from jielong.models.presets import load_model

    dev = resolve_device(device)
    model = load_model(model_dir)
    unsupported = set(getattr(model.config, "layer_types", None) or ()) - set(MASKED_LAYER_TYPES)
    if unsupported:
        raise ValueError(f"{model_dir}: layers of type {', '.join(sorted(unsupported))} cannot be scored by jielong "
                         f"(its packed attention masks are built for {' and '.join(MASKED_LAYER_TYPES)} layers only)")
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


MASKED_LAYER_TYPES = ("full_attention", "sliding_attention")


def layer_masks(config, mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
    """What the model's layers take for a 4-D boolean mask (B, 1, L, L) over tokens at logical
    positions (B, L). A sliding-window layer also hides keys `window` or more positions back (the rule
    transformers applies to the masks it builds itself, but not to one it is given); a model with both
    kinds of layer gets one mask per kind. Eager attention adds its mask to the scores: 0 or -inf-like."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    sliding = window is not None and (types is None or "sliding_attention" in types)
    masks = {"full_attention": mask, "sliding_attention": mask}
    if sliding and int(position_ids.max()) >= window:  # a shorter span never reaches past the window
        distance = position_ids[:, None, :, None] - position_ids[:, None, None, :]
        masks["sliding_attention"] = mask & (distance < window)
    if config._attn_implementation == "eager":
        masks = {kind: _additive(m) for kind, m in masks.items()}
    if types is None:  # one kind of layer: sliding ones when the config names a window
        return masks["sliding_attention" if sliding else "full_attention"]
    return masks


def _additive(mask: torch.Tensor) -> torch.Tensor:
    return torch.zeros(mask.shape).masked_fill_(~mask, torch.finfo(torch.float32).min)


def final_hidden(lm: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor) -> torch.Tensor:
    """The decoder's last hidden states (B, L, d) for a packed batch, without computing logits for every
    position."""
    masks = layer_masks(lm.model.config, attention_mask, position_ids)
    masks = {k: m.to(lm.device) for k, m in masks.items()} if isinstance(masks, dict) else masks.to(lm.device)
    with torch.inference_mode(), lm.autocast_context():
        out = lm.model.get_decoder()(
            input_ids=input_ids.to(lm.device), attention_mask=masks, position_ids=position_ids.to(lm.device),
            use_cache=False,
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
