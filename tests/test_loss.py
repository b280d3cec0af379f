"""The fused linear cross-entropy (models/loss.py) against F.cross_entropy of the whole logits, and the
training loop with it on and off (models/train.py).

Tolerances. In float64 the two differ only in the order of their sums (chunked sums, a weight gradient
summed over chunks), so they agree to ~1e-15 relative; we allow 1e-10. In float32 the same reordering
leaves ~1e-7 relative; we allow 1e-5. Under CPU bf16 autocast both compute the logits with bf16 matmuls,
but a chunk's matmul may round differently from the whole one's and the weight gradient is rounded to
bf16 per chunk instead of once: relative differences of ~2e-3 were measured, below bf16's 2^-8 = 3.9e-3
step; we allow 1e-2 on gradients (a norm ratio) and 1e-3 on the loss (~8 nats: ~1e-4 relative).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from jielong.models.loss import default_chunk, linear_cross_entropy, split_head

VOCAB = 300


def tiny_lm(tied: bool, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tied)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(dtype)


def batch(rows: int = 3, length: int = 21):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(VOCAB, (rows, length + 1), generator=generator)
    targets = ids[:, 1:].clone()
    targets[0, :7] = -100  # a prompt whose tokens are not trained on
    targets[2, -3:] = -100
    return ids[:, :-1], targets


def loss_and_grads(model, compute):
    model.zero_grad(set_to_none=True)
    loss = compute()
    (3.0 * loss).backward()  # a gradient flowing in other than 1 (as with grad_accum) must scale both paths
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def plain(model, ids, targets):
    logits = model(input_ids=ids).logits  # as models/train.py, at least float32 (float64 stays float64)
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(wide.flatten(0, 1), targets.flatten(), ignore_index=-100)


def fused(model, ids, targets, chunk):
    head = split_head(model)
    return linear_cross_entropy(head.body(input_ids=ids).last_hidden_state, head.weight, targets, chunk=chunk)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_fused_loss_and_every_gradient_equal_the_plain_ones(tied, dtype, tolerance):
    """Loss and the gradient of every parameter (so of the hidden states too, backpropagated; and of the
    output weight, which for tied embeddings adds up with the embedding's own gradient)."""
    model = tiny_lm(tied, dtype)
    ids, targets = batch()
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    loss, grads = loss_and_grads(model, lambda: plain(model, ids, targets))
    positions = targets.numel()
    for chunk in (1, 8, 13, positions, 1000):  # 13 does not divide the 63 positions; 1000 is one chunk
        fused_loss, fused_grads = loss_and_grads(model, lambda: fused(model, ids, targets, chunk))
        assert math.isclose(fused_loss, loss, rel_tol=tolerance), (chunk, fused_loss, loss)
        for name, grad in grads.items():
            torch.testing.assert_close(fused_grads[name], grad, rtol=tolerance, atol=tolerance * grad.abs().max().item(),
                                       msg=lambda m: f"{name}, chunk {chunk}: {m}")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradients_of_hidden_states_and_weight_directly(reduction):
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 19, 16, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(VOCAB, 16, dtype=torch.float64, generator=generator, requires_grad=True)
    targets = torch.randint(VOCAB, (2, 19), generator=generator)
    targets[1, ::3] = -100
    reference = F.cross_entropy((hidden @ weight.T).flatten(0, 1), targets.flatten(), reduction=reduction)
    expected = torch.autograd.grad(reference, (hidden, weight))
    for chunk in (5, 38):
        loss = linear_cross_entropy(hidden, weight, targets, reduction=reduction, chunk=chunk)
        torch.testing.assert_close(loss, reference, rtol=1e-12, atol=0)
        for got, want in zip(torch.autograd.grad(loss, (hidden, weight)), expected):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    with torch.no_grad():  # evaluation: the loss alone
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets, reduction=reduction, chunk=7), reference)
    frozen = linear_cross_entropy(hidden, weight.detach(), targets, reduction=reduction, chunk=5)
    torch.testing.assert_close(torch.autograd.grad(frozen, hidden)[0], expected[0], rtol=1e-10, atol=1e-14)


def test_every_target_ignored_gives_nan_and_zero_gradients_as_cross_entropy():
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(VOCAB, 8, requires_grad=True)
    targets = torch.full((6,), -100)
    loss = linear_cross_entropy(hidden, weight, targets, chunk=4)
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(hidden @ weight.T, targets))
    loss.backward()
    assert not hidden.grad.any() and not weight.grad.any()


def test_under_bf16_autocast_the_fused_loss_matches_the_plain_one_to_bf16_rounding():
    model = tiny_lm(tied=True)
    ids, targets = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = loss_and_grads(model, lambda: plain(model, ids, targets))
        for chunk in (8, 13):
            fused_loss, fused_grads = loss_and_grads(model, lambda: fused(model, ids, targets, chunk))
            assert abs(fused_loss - loss) < 1e-3, (chunk, fused_loss, loss)
            for name, grad in grads.items():
                assert fused_grads[name].dtype == grad.dtype == torch.float32
                assert (fused_grads[name] - grad).norm() <= 1e-2 * grad.norm(), (name, chunk)


def test_compiled_chunk_arithmetic_matches_the_eager_one():
    """`compiled=True` (what `compile: true` uses) compiles the per-chunk softmax with inductor (~15 s here)."""
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(64, 16, generator=generator, requires_grad=True)
    weight = torch.randn(VOCAB, 16, generator=generator, requires_grad=True)
    targets = torch.randint(VOCAB, (64,), generator=generator)
    targets[:5] = -100
    eager = linear_cross_entropy(hidden, weight, targets, chunk=32)
    compiled = linear_cross_entropy(hidden, weight, targets, chunk=32, compiled=True)
    torch.testing.assert_close(compiled, eager)
    for got, want in zip(torch.autograd.grad(compiled, (hidden, weight)), torch.autograd.grad(eager, (hidden, weight))):
        torch.testing.assert_close(got, want)


def test_default_chunk_bounds_the_logits_of_a_chunk():
    assert default_chunk(65536, 49152) == 4096  # 4096 x 49152 logits: 0.75 GiB in float32
    assert default_chunk(4096, 4096) == 4096  # a tiny CPU batch: one chunk
    assert default_chunk(10, 2**40) == 1


def test_only_plain_output_layers_are_split():
    from transformers import AutoModelForCausalLM, GPT2Config

    model = tiny_lm(tied=False)
    head = split_head(model)
    assert head.body is model.model and head.weight is model.lm_head.weight
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(VOCAB))
    assert split_head(model) is None, "a bias is not in the fused loss"
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB))
    assert split_head(gpt2) is None, "a family not known to have a plain head keeps the plain loss"


# ---------------------------------------------------------------- the training loop


class PatternBatches:
    """Learnable rows (arithmetic progressions modulo 32: 32 of the vocabulary's tokens), a pure function
    of the step."""

    def __init__(self, vocab: int, context: int, rows: int):
        self.vocab, self.context, self.rows = vocab, context, rows

    def get(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(step * 16 + micro)
        start = torch.randint(self.vocab, (self.rows, 1), generator=generator)
        stride = torch.randint(1, 5, (self.rows, 1), generator=generator)
        tokens = (start + stride * torch.arange(self.context + 1)) % 32
        targets = tokens[:, 1:].clone()
        targets[:, :4] = -100  # the first few positions are not trained on
        return {"input_ids": tokens[:, :-1].contiguous(), "targets": targets}

    def validation(self) -> list[dict[str, torch.Tensor]]:
        return [self.get(10**6, 0)]


def train_tiny(tmp_path: Path, fused_loss: str, precision: str, steps: int = 8):
    from jielong.models.config import TrainConfig
    from jielong.models.presets import build_model, model_config
    from jielong.models.train import train

    model = build_model(model_config("tiny", 4096, 0, 0, 1, context_length=64), seed=0)
    settings = TrainConfig(steps=steps, batch_size=4, grad_accum=2, warmup_steps=2, precision=precision, device="cpu",
                           eval_every=4, eval_batches=1, checkpoint_every=10**6, fused_loss=fused_loss)
    report = train(model, PatternBatches(4096, 64, 4), settings, tmp_path / f"ckpt-{fused_loss}-{precision}",
                   lambda points: None, "test", tmp_path / "peak.json")
    return report, model


@pytest.mark.parametrize("precision,tolerance", [("fp32", 1e-4), ("bf16", 1e-2)])
def test_a_few_training_steps_give_the_same_losses_with_the_fused_loss(tmp_path: Path, precision, tolerance):
    """8 steps of the tiny preset (2 micro-batches a step, ignored targets, validation every 4 steps), the
    loss falling from 8.3 to 5.7 nats. Measured largest differences between the curves: 7e-7 nats in fp32
    (float rounding, barely amplified by AdamW over 8 steps); 3e-3 in bf16, as large as the difference
    between the bf16 and the fp32 curves themselves (2e-3): bf16 noise. Allowed: 1e-4 and 1e-2."""
    plain_report, _ = train_tiny(tmp_path, "off", precision)
    fused_report, _ = train_tiny(tmp_path, "on", precision)
    assert (plain_report.loss, fused_report.loss) == ("plain", "fused")
    plain_curve = [loss for _, loss in plain_report.curves["loss"]]
    fused_curve = [loss for _, loss in fused_report.curves["loss"]]
    assert plain_curve[0] - plain_curve[-1] > 2, "the curve falls: the comparison is not of a flat line"
    assert max(abs(a - b) for a, b in zip(plain_curve, fused_curve)) < tolerance, (plain_curve, fused_curve)
    for (step, a), (_, b) in zip(plain_report.curves["val_loss"], fused_report.curves["val_loss"]):
        assert abs(a - b) < tolerance, (step, a, b)


def test_auto_keeps_the_plain_loss_on_cpu_bit_for_bit(tmp_path: Path):
    auto_report, auto_model = train_tiny(tmp_path, "auto", "fp32", steps=2)
    off_report, off_model = train_tiny(tmp_path, "off", "fp32", steps=2)
    assert auto_report.loss == "plain"
    for (name, a), b in zip(auto_model.state_dict().items(), off_model.state_dict().values()):
        assert torch.equal(a, b), name


def test_fused_loss_setting_enters_the_key_only_when_set():
    from pydantic import ValidationError

    from jielong.models.config import TrainConfig
    from jielong.tasks.core.schema import output_fields

    assert "fused_loss" not in output_fields(TrainConfig())  # auto: every existing key stays what it was
    assert output_fields(TrainConfig(fused_loss="on"))["fused_loss"] == "on"
    assert output_fields(TrainConfig(fused_loss="off"))["fused_loss"] == "off"
    with pytest.raises(ValidationError, match="fused_loss: on"):
        TrainConfig(fused_loss="on", distributed="ddp", nproc=2, batch_size=4)


def test_fused_loss_on_for_a_model_it_cannot_split_is_a_message():
    """`fused_loss: on` for a model whose logits are not lm_head(hidden states) stops with a UserError (a
    message, no traceback); `auto` falls back to the plain loss and `off` never splits."""
    from jielong.models.parallel import OneProcess
    from jielong.models.train import resolve_fused_loss
    from jielong.tasks.core.schema import UserError

    model = torch.nn.Linear(4, 4)
    with pytest.raises(UserError, match="fused_loss: on is not available for Linear"):
        resolve_fused_loss("on", "cpu", model, OneProcess())
    assert resolve_fused_loss("auto", "cuda", model, OneProcess()) is None
    assert resolve_fused_loss("off", "cuda", model, OneProcess()) is None
