"""The output layer and cross-entropy in one, chunk by chunk over positions: the logits are never whole.

A causal LM's loss is `cross_entropy(hidden @ W.T, targets)`. Made whole, the logits of a SmolLM2-sized
vocabulary (49,152) over a 65,536-token step are 3.2 G numbers: 6.4 GB in bf16, 13 GB again in float32,
and more for the softmax and its gradient. `linear_cross_entropy` computes the same loss a slice of
positions at a time: per chunk, the logits in the compute dtype (bf16 under autocast), upcast to float32
for the log-sum-exp, the chunk's summed loss, and, when gradients are wanted, the chunk's gradient of
the logits, from which it takes at once its share of the hidden states' gradient and adds its share of
the weight's gradient (Liger Kernel's approach; written here from the maths). Backward only scales
those stored gradients by the incoming one, so no matmul is recomputed and nothing of a chunk outlives
it: the loss costs the three matmuls of the plain path and a few chunk-sized buffers of memory.

The arithmetic is the plain path's: under autocast the logits come out of a bf16 matmul and are upcast
(as `F.cross_entropy(logits.float(), ...)` after an autocast `lm_head`); the logits' gradient is
(softmax - one_hot) / count in float32, cast to the compute dtype for the two gradient matmuls, as
autocast's backward does. What differs is the order of sums (a chunk's matmul may block differently
from the whole one's; the loss is summed chunk by chunk; the weight gradient is each chunk's bf16
matmul summed in float32, where the plain path rounds the whole sum to bf16 once), so results agree
to float rounding: ~1e-15 relative in float64, bf16 rounding under autocast. `ignore_index`
targets add nothing and `mean` divides by the number of other targets, as `F.cross_entropy` does (nan
when there is none, with zero gradients).

With `compiled=True` the per-chunk softmax arithmetic (not the matmuls) is one `torch.compile`d
function, so that it runs as a couple of fused kernels instead of several passes over float32
buffers. The loss itself stays an eager `autograd.Function`: compile the model body, and call this on
its output (models/train.py does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# Model types whose causal-LM forward is exactly `lm_head(model(...).last_hidden_state)`: no logit
# scaling or soft-capping, a bias-free output layer (checked too). Others train with the plain loss.
PLAIN_HEAD_TYPES = ("llama", "mistral", "qwen2", "qwen3")

CHUNK_ELEMENTS = 2**28  # logits per chunk: 1 GiB in float32


def default_chunk(positions: int, vocab: int) -> int:
    """Positions per chunk: the largest power of two whose logits fit CHUNK_ELEMENTS (at most all)."""
    chunk = 1 << max(0, (CHUNK_ELEMENTS // vocab).bit_length() - 1)
    return max(1, min(positions, chunk))


def _wide(dtype: torch.dtype) -> torch.dtype:
    """Where the softmax is computed: float32, or the logits' dtype if wider."""
    return torch.promote_types(dtype, torch.float32)


def _loss_and_grad(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, scale: torch.Tensor):
    """One chunk: its summed loss (float32) and the gradient of `scale` x that sum w.r.t. the logits
    (in the logits' dtype): (softmax - one_hot) x scale, zero on ignored rows."""
    x = logits.to(_wide(logits.dtype))
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)[:, None]
    lse = torch.logsumexp(x, dim=-1)
    target_logit = x.gather(1, safe).squeeze(1)
    loss = torch.where(valid, lse - target_logit, 0.0).sum()
    share = valid * scale  # each row's weight in the loss: scale, or 0 for an ignored row
    probs = x - lse[:, None]
    grad = probs.exp_().mul_(share[:, None]).to(logits.dtype)
    # the target's entry, (p - 1) x share, computed in float32 like the others and rounded once
    grad.scatter_(1, safe, ((torch.exp(target_logit - lse) - 1.0) * share).to(logits.dtype)[:, None])
    return loss, grad


def _loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    x = logits.to(_wide(logits.dtype))
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    return torch.where(valid, torch.logsumexp(x, dim=-1) - x.gather(1, safe[:, None]).squeeze(1), 0.0).sum()


_COMPILED: dict[str, Callable] = {}


def _kernel(name: str, compiled: bool) -> Callable:
    fn = {"loss_and_grad": _loss_and_grad, "loss": _loss}[name]
    if not compiled:
        return fn
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, dynamic=False)
    return _COMPILED[name]


def _chunks(n: int, chunk: int):
    return ((start, min(n, start + chunk)) for start in range(0, n, chunk))


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed (then scaled) loss of `hidden @ weight.T`; gradients computed in forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, reduction, chunk, dtype, compiled):
        shape = hidden.shape
        h, t = hidden.reshape(-1, shape[-1]), targets.reshape(-1)
        count = (t != ignore_index).sum()
        # mean: each target's share is 1/count (clamped: with no target the gradients are zero, the loss nan)
        wide = _wide(dtype)
        scale = 1.0 / count.clamp(min=1).to(wide) if reduction == "mean" else torch.ones((), dtype=wide, device=h.device)
        w = weight.to(dtype)
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(h) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=_wide(weight.dtype)) if need_weight else None
        kernel = _kernel("loss_and_grad", compiled)
        total = torch.zeros((), dtype=wide, device=h.device)
        with torch.autocast(h.device.type, enabled=False):
            for start, stop in _chunks(h.shape[0], chunk):
                hc = h[start:stop].to(dtype)
                loss, grad = kernel(hc @ w.T, t[start:stop], ignore_index, scale)
                total += loss
                if need_hidden:
                    grad_hidden[start:stop] = grad @ w
                if need_weight:
                    grad_weight += grad.T @ hc
        ctx.save_for_backward(grad_hidden.view(shape) if need_hidden else None,
                              grad_weight.to(weight.dtype) if need_weight else None)
        return total / count if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * grad_loss if grad_hidden is not None else None,
                grad_weight * grad_loss if grad_weight is not None else None,
                None, None, None, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         reduction: str = "mean", chunk: int | None = None, compiled: bool = False) -> torch.Tensor:
    """`F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=..., reduction=...)` without
    the whole logits: hidden (..., d), weight (V, d), targets (...). Under autocast the matmuls run in
    the autocast dtype; otherwise in hidden's. `chunk`: positions per chunk (default: `default_chunk`)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be mean or sum, not {reduction!r}")
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    positions = hidden.numel() // hidden.shape[-1]
    chunk = chunk or default_chunk(positions, weight.shape[0])
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, ignore_index, reduction, chunk, dtype, compiled)
    # no gradient wanted (evaluation): the loss alone, chunk by chunk
    h, t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    w = weight.to(dtype)
    kernel = _kernel("loss", compiled)
    with torch.autocast(device_type, enabled=False):
        total = sum(kernel(h[start:stop].to(dtype) @ w.T, t[start:stop], ignore_index)
                    for start, stop in _chunks(h.shape[0], chunk))
    return total / (t != ignore_index).sum() if reduction == "mean" else total


@dataclass
class FusedHead:
    """A causal LM split for the fused loss: its body (hidden states after the final norm) and its
    output layer's weight (for tied embeddings, the input embedding itself)."""

    body: Callable
    weight: torch.Tensor
    compiled: bool = False

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        hidden = self.body(input_ids=input_ids).last_hidden_state
        return linear_cross_entropy(hidden, self.weight, targets, reduction=reduction, compiled=self.compiled)


def split_head(model) -> FusedHead | None:
    """The model's body and output weight when its logits are exactly `lm_head(body(...))`, else None."""
    if getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
        return None  # peft's virtual tokens are added by its own forward
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft (LoRA): the model inside
    config = getattr(lm, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_TYPES or not hasattr(lm, "get_output_embeddings"):
        return None
    head = lm.get_output_embeddings()
    body = getattr(lm, "base_model", None)
    if type(head) is not torch.nn.Linear or head.bias is not None or body is None or body is lm:
        return None
    return FusedHead(body, head.weight)
