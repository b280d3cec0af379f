"""instruct: supervised fine-tuning of the pretrained model on instruction/response pairs.

Sources (`instruct.sources`):
  builtin  pairs derived deterministically from the built-in corpus documents of the dedup artifact:
           "What does json.dumps do?" -> the summary paragraph of its docstring; "What is the textwrap
           module for?" -> the module docstring's summary; "Explain the Python language reference
           topic `with`." -> the opening of that topic. Pairs from train-split documents are trained
           on; pairs from validation/test documents are held out, so evaluation pairs are never seen.
  alpaca   JSON or JSONL records with instruction, input (optional), output; or self-instruct's records,
           an instruction and `instances` [{input, output}], one pair per instance.
  chat     JSONL records with `messages`: [{role: system|user|assistant, content}, ...].
           alpaca/chat records are held out by a hash of their content (`heldout_fraction`).
Each source is accounted for (SourceCount): records read, pairs made, drops by reason with an example id.

Every record is a conversation rendered with the pretrained model's own chat template (jielong's
models trained from scratch carry models/tokenizer.py's; a model from elsewhere keeps its own, e.g.
SmolLM2's ChatML). The loss is on assistant replies (and the template's end-of-turn after them) only.
Before and after fine-tuning: the response loss on held-out pairs, and generations for the first
`generations` held-out prompts, logged side by side as an MLflow table.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field as dc_field
import math
import re
from collections import Counter
from pathlib import Path
from typing import Iterator

import xxhash

from typing import Literal
from pydantic import Field, model_validator

from jielong.models.presets import load_model
from jielong.models.config import LoraSettings, TrainConfig
from jielong.tasks.core.schema import KEYED_WHEN_SET, NO_OUTPUT, Strict, UserError
from jielong.tasks.core.contract import Stage, StageContext, StageResult
from jielong.tasks.lib.model_card import inherited_base, write_card
from jielong.tasks.lib.sources import reader
from jielong.tasks.pretrain import compute_metrics, plot_curves, report_metrics, save_hf_model
from jielong.tasks.core.shards import read_rows
from jielong.tasks.lib.training import fit



# ---------------------------------------------------------------- config section


class InstructSource(Strict):
    """builtin: pairs derived from the built-in corpus documents (train split -> training pairs,
    validation/test -> held-out pairs); alpaca: JSON/JSONL with instruction, input, output;
    chat: JSONL with `messages` [{role, content}]."""

    kind: Literal["builtin", "alpaca", "chat"] = "builtin"
    path: str | None = None
    limit: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _path_for_files(self) -> "InstructSource":
        if self.kind != "builtin" and not self.path:
            raise ValueError(f"an instruct source of kind {self.kind!r} needs a path")
        return self


class InstructConfig(TrainConfig):
    sources: list[InstructSource] = Field(default_factory=lambda: [InstructSource()], min_length=1)
    heldout_fraction: float = Field(0.1, ge=0, lt=1, description="of alpaca/chat records, by hash")
    max_length: int = Field(256, ge=16, description="prompt + response tokens; longer pairs are truncated")
    generations: int = Field(8, ge=0, description="held-out prompts generated before/after, logged as a table")
    max_new_tokens: int = Field(48, ge=1)
    choice_examples: int = Field(100, ge=0, description="held-out prompts scored as a multiple choice among replies, "
                                 "before and after tuning (0: none)")
    choice_candidates: int = Field(4, ge=2, description="replies per choice: the prompt's own and the next prompts'")
    steps: int = Field(120, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(10, ge=0)
    eval_every: int = Field(40, ge=1)
    checkpoint_every: int = Field(60, ge=1, json_schema_extra=NO_OUTPUT)
    register_as: str | None = Field("jielong-instruct", json_schema_extra=NO_OUTPUT)
    lora: LoraSettings | None = Field(None, description="null: full fine-tuning; else LoRA with these settings")
    objective: Literal["chat", "replies"] = Field(
        "chat", description="chat: each pair in the chat template, the loss on the reply; replies: continued "
        "pretraining on the reply texts alone (no prompt, no template), the control that tells learning to follow "
        "instructions apart from learning the replies' text. The held-out measures are the same for both",
        json_schema_extra=KEYED_WHEN_SET)
    flops_budget: float | None = Field(None, gt=0, description="train for the steps this compute allows, 6·N·D with D "
                                       "the padded batches' tokens, instead of `steps`", json_schema_extra=KEYED_WHEN_SET)

    @model_validator(mode="after")
    def _budget_sets_the_steps(self) -> "InstructConfig":
        default = type(self).model_fields["steps"].default
        if self.flops_budget is not None and self.steps != default:
            raise ValueError(f"instruct.flops_budget sets the number of steps, so instruct.steps cannot change the "
                             f"model: leave it at its default ({default})")
        return self

    @model_validator(mode="after")
    def _lora_in_one_process(self) -> "InstructConfig":
        if self.lora is not None and self.distributed != "none":
            raise ValueError("instruct.lora trains in one process: torchrun workers load plain weights, so set "
                             "instruct.distributed=none (or drop instruct.lora for ddp/fsdp)")
        return self


VERSION = "7"  # 4: model/README.md, the model card; 5: train_flops, the held-out response choice accuracy; 6: per-source accounting (details.sources, sources.json), drop reasons missing_field/empty/malformed/too_long, self-instruct records one pair per instance; 7: items.json, the held-out measures per pair
ROLES = {"system", "user", "assistant"}
_HEADING_RULE = re.compile(r"^[*=\-^~#]{3,}\s*$")


# ---------------------------------------------------------------- pairs from the built-in corpus


def summary(text: str, max_chars: int = 400) -> str:
    """The first paragraph without reST heading rules, cut at a sentence end near max_chars."""
    lines = [line for line in text.strip().splitlines() if not _HEADING_RULE.match(line.strip())]
    paragraphs = [p for p in "\n".join(lines).split("\n\n") if p.strip()]
    if not paragraphs:
        return ""
    # skip a title line ("The "with" statement") and indented grammar/code blocks when prose follows
    prose = [p for p in paragraphs if len(p.split()) >= 6 and not p[:1].isspace()]
    first = " ".join((prose or paragraphs)[0].split())
    if len(first) > max_chars:
        cut = first.rfind(". ", 0, max_chars)
        first = first[: cut + 1] if cut > 40 else first[:max_chars].rsplit(" ", 1)[0] + " ..."
    return first


def question_for(doc_id: str, text: str) -> str | None:
    if doc_id.startswith("pydoc:"):
        return f"Explain the Python language reference topic `{doc_id[len('pydoc:'):]}`."
    if not doc_id.startswith("stdlib:"):
        return None
    _, module, qualname = (doc_id.split("#")[0].split(":") + [""])[:3]
    if not qualname:
        return f"What is the {module} module for?"
    name = f"{module}.{qualname}"
    return f"What is {name}?" if qualname.split(".")[-1][:1].isupper() else f"What does {name} do?"


def builtin_conversations(files: list[Path], count: SourceCount) -> list[tuple[str, list[dict]]]:
    conversations = []
    for path in files:
        for row in read_rows(path, columns=["id", "text"]):
            count.records += 1
            question = question_for(row["id"], row["text"])
            answer = summary(row["text"])
            if question is None:
                count.drop("not_builtin_corpus", row["id"])
            elif len(answer.split()) < 3:
                count.drop("no_summary", row["id"])
            else:
                count.pairs += 1
                conversations.append((row["id"], [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]))
    return conversations


# ---------------------------------------------------------------- alpaca and chat files

# why a record (or one instance of a self-instruct record) gave no pair
DROP_REASONS = ("missing_field", "empty", "malformed", "too_long")
EXPECTED = {
    "alpaca": "instruction and output (input optional), or instruction and instances: [{input, output}] (self-instruct)",
    "chat": "messages: [{role: system|user|assistant, content}, ...] with an assistant turn",
}


@dataclass
class SourceCount:
    """What one instruct source gave: records read, pairs made, drops by reason with one example id each,
    and the top-level fields its records had (named when nothing usable was found)."""

    source: str
    kind: str
    records: int = 0
    pairs: int = 0
    dropped: Counter = dc_field(default_factory=Counter)
    example: dict = dc_field(default_factory=dict)
    fields: Counter = dc_field(default_factory=Counter)

    def drop(self, reason: str, example_id: str) -> None:
        self.dropped[reason] += 1
        self.example.setdefault(reason, example_id)

    def as_dict(self) -> dict:
        return {"source": self.source, "kind": self.kind, "records_read": self.records, "pairs": self.pairs,
                "dropped": {r: {"count": n, "example_id": self.example[r]} for r, n in sorted(self.dropped.items())},
                "fields_found": [name for name, _ in self.fields.most_common()]}

    def line(self) -> str:
        drops = ", ".join(f"{r} {n:,} (e.g. {self.example[r]})" for r, n in sorted(self.dropped.items()))
        return (f"instruct source {self.kind} {self.source}: {self.records:,} records read, {self.pairs:,} pairs"
                + (f"; dropped {drops}" if drops else ""))

    def nothing_usable(self) -> str:
        found = ", ".join(name for name, _ in self.fields.most_common(12)) or "none (no JSON objects)"
        return f"{self.line()}. Fields found: {found}; expected: {EXPECTED.get(self.kind, '')}"


def _records(source) -> Iterator[tuple[str, object]]:
    """(id, record) of each record of an alpaca/chat source (a file or a folder of .json/.jsonl/.parquet/.csv
    files), read by the same reader as ingest; a record that cannot be read comes as its drop reason."""
    path = Path(source.path).expanduser()
    if not path.exists():
        raise UserError(f"instruct source {source.path} does not exist")
    for file, rel in reader.list_files(path):
        fmt, _ = reader.format_of(file)  # a .txt or suffix-less file is read as JSON (array or lines)
        for item in reader.read_file(file, rel, reader.FileOptions(format=None if fmt in reader.STRUCTURED else "json")):
            if "record" in item:
                record = item["record"]
                own = record.get("id") if isinstance(record, dict) else None
                yield (str(own) if isinstance(own, (str, int)) else item["id"]), record
            else:  # a rejection, or plain text where records were expected
                yield item["id"], "too_long" if item.get("reason") == "too_long" else "malformed"


def _text_field(record: dict, name: str) -> str | None:
    """The field's stripped text; "" when present but blank; None when missing or not a string."""
    value = record.get(name)
    return value.strip() if isinstance(value, str) else None


def alpaca_conversations(record) -> list[list[dict] | str]:
    """An alpaca record is one pair; a self-instruct record (instruction + instances[{input, output}]) is one
    pair per instance. Each entry is a conversation or the reason it could not be one."""
    if not isinstance(record, dict):
        return ["malformed"]
    instruction = _text_field(record, "instruction")
    if isinstance(record.get("instances"), list) and "output" not in record:
        if instruction is None:
            return ["missing_field"]
        return [_alpaca_pair(instruction, inst.get("input") or "", _text_field(inst, "output"))
                if isinstance(inst, dict) else "malformed" for inst in record["instances"]] or ["empty"]
    return [_alpaca_pair(instruction, record.get("input") or "", _text_field(record, "output"))]


def _alpaca_pair(instruction: str | None, extra, output: str | None) -> list[dict] | str:
    if instruction is None or output is None:
        return "missing_field"
    if not instruction or not output:
        return "empty"
    prompt = instruction + (f"\n\n{extra.strip()}" if isinstance(extra, str) and extra.strip() else "")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def chat_conversations(record) -> list[list[dict] | str]:
    if not isinstance(record, dict):
        return ["malformed"]
    messages = record.get("messages")
    if messages is None:
        return ["missing_field"]
    if not isinstance(messages, list):
        return ["malformed"]
    if not messages:
        return ["empty"]
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            return ["malformed"]
    if not any(m["role"] == "assistant" for m in messages):
        return ["missing_field"]
    return [[{"role": m["role"], "content": m["content"]} for m in messages]]


def file_conversations(source, fraction: float) -> tuple[list, list, SourceCount]:
    parse = alpaca_conversations if source.kind == "alpaca" else chat_conversations
    train, heldout = [], []
    count = SourceCount(source.path, source.kind)
    for record_id, record in itertools.islice(_records(source), source.limit):
        count.records += 1
        if isinstance(record, dict):
            count.fields.update(record.keys())
        results = [record] if isinstance(record, str) else parse(record)
        for i, conversation in enumerate(results):
            if isinstance(conversation, str):
                count.drop(conversation, record_id if len(results) == 1 else f"{record_id}/instances[{i}]")
                continue
            count.pairs += 1
            digest = xxhash.xxh3_64_intdigest(json.dumps(conversation, sort_keys=True).encode()) / 2.0**64
            (heldout if digest < fraction else train).append((record_id, conversation))
    return train, heldout, count


# ---------------------------------------------------------------- encoding


def chat_pieces(conversation: list[dict], tokenizer) -> list[tuple[str, bool]]:
    """The conversation as rendered by the tokenizer's own chat template, cut into (text, trained)
    pieces: each assistant reply (with what the template closes it with) is trained on, the rest
    (system prompt, user turns, the assistant header) is context. Found by rendering growing prefixes
    of the conversation, so any template that renders a conversation as the concatenation of its
    turns works (jielong's, ChatML as in SmolLM2, Llama's, ...)."""
    def render(messages: list[dict], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)

    pieces, done = [], ""
    for i, message in enumerate(conversation):
        marks = [(render(conversation[:i], True), False)] if message["role"] == "assistant" else []
        marks.append((render(conversation[: i + 1], False), message["role"] == "assistant"))
        for text, trained in marks:
            if not text.startswith(done):
                raise UserError("instruct: the tokenizer's chat template does not render a conversation turn by "
                                "turn (a longer conversation does not start with a shorter one's text)")
            if len(text) > len(done):
                pieces.append((text[len(done):], trained))
            done = text
    return pieces


def encode(conversation: list[dict], tokenizer, max_length: int) -> tuple[list[int], list[int]]:
    """(input ids, targets): targets are the next token where it belongs to an assistant reply, else -100."""
    ids: list[int] = []
    trained: list[bool] = []
    for text, loss in chat_pieces(conversation, tokenizer):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        trained += [loss] * len(piece)
    ids, trained = ids[: max_length + 1], trained[: max_length + 1]
    targets = [nxt if loss else -100 for nxt, loss in zip(ids[1:], trained[1:])]
    return ids[:-1], targets


def encode_reply(conversation: list[dict], tokenizer, max_length: int) -> tuple[list[int], list[int]]:
    """The last reply's text alone as a pretraining document (end-of-text before and after, every next
    token trained): what the `replies` objective trains on."""
    eos = tokenizer.eos_token_id
    ids = [eos, *tokenizer(conversation[-1]["content"], add_special_tokens=False)["input_ids"], eos][: max_length + 1]
    return ids[:-1], ids[1:]


def steps_for_flops(lengths: list[int], batch_size: int, grad_accum: int, seed: int, n_params: int, budget: float) -> int:
    """The optimizer steps whose padded batches (PairBatches' order: a seeded permutation per epoch, each batch
    padded to its longest sequence) cost at most `budget` = 6·N·tokens (at least 1)."""
    import torch

    per_step, spent, steps, sample = batch_size * grad_accum, 0.0, 0, 0
    orders: dict[int, list[int]] = {}
    while True:
        tokens = 0
        for micro in range(grad_accum):
            widths = []
            for _ in range(batch_size):
                epoch, index = divmod(sample, len(lengths))
                if epoch not in orders:
                    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
                    orders[epoch] = torch.randperm(len(lengths), generator=generator).tolist()
                widths.append(lengths[orders[epoch][index]])
                sample += 1
            tokens += batch_size * max(widths)
        if spent + 6 * n_params * tokens > budget:
            return max(1, steps)
        spent += 6 * n_params * tokens
        steps += 1
        if steps > 10_000_000 // max(per_step, 1):
            raise UserError(f"instruct.flops_budget {budget:g} asks for more than {steps} steps")


def encode_trainable(pairs: list[tuple[SourceCount, str, list[dict]]], tokenizer,
                     max_length: int) -> tuple[list[list[dict]], list[tuple[list[int], list[int]]]]:
    """The conversations whose reply keeps at least one token within max_length, and their encodings;
    the others are dropped from their source's count as `too_long` (a batch of only those would make the
    loss 0/0)."""
    kept, encoded = [], []
    for count, record_id, conversation in pairs:
        pair = encode(conversation, tokenizer, max_length)
        if any(t != -100 for t in pair[1]):
            kept.append(conversation)
            encoded.append(pair)
        else:
            count.pairs -= 1
            count.drop("too_long", record_id)
    return kept, encoded


def prompt_of(conversation: list[dict]) -> list[dict]:
    """Everything before the last assistant turn."""
    last = max(i for i, m in enumerate(conversation) if m["role"] == "assistant")
    return conversation[:last]


def generate_replies(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int, device: str) -> list[str]:
    import torch

    model.eval()
    replies = []
    for conversation in conversations:
        prompt = tokenizer.apply_chat_template(prompt_of(conversation), add_generation_prompt=True, tokenize=False)
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
        ids = ids[:, -max(1, model.config.max_position_embeddings - max_new_tokens):]
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        replies.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return replies


def response_choices(model, tokenizer, heldout: list[list[dict]], cfg: InstructConfig, device: str,
                     precision: str) -> list[bool] | None:
    """Instruction following as a multiple choice: for each of the first `choice_examples` held-out
    prompts, its own reply and the replies of the next `choice_candidates - 1` held-out prompts are scored
    by their mean log-likelihood per token after the prompt; per prompt, whether its own ranks first (the
    accuracy is their mean; chance: 1 / choice_candidates). None without enough held-out pairs."""
    import torch
    import torch.nn.functional as F

    n = min(cfg.choice_examples, len(heldout))
    if n == 0 or len(heldout) < cfg.choice_candidates:
        return None
    was_training = model.training
    model.eval()
    correct = []
    for i in range(n):
        prompt = prompt_of(heldout[i])
        replies = [heldout[(i + j) % len(heldout)][-1]["content"] for j in range(cfg.choice_candidates)]
        pairs = [encode(prompt + [{"role": "assistant", "content": reply}], tokenizer, cfg.max_length) for reply in replies]
        width = max(len(ids) for ids, _ in pairs)
        # padded on the right: under causal attention no real token sees the padding, so no mask is needed
        ids = torch.tensor([p[0] + [tokenizer.pad_token_id] * (width - len(p[0])) for p in pairs], device=device)
        targets = torch.tensor([p[1] + [-100] * (width - len(p[1])) for p in pairs], device=device)
        with torch.inference_mode(), torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(input_ids=ids).logits
        losses = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=-100, reduction="none")
        counts = (targets != -100).sum(dim=1)
        mean_loss = torch.where(counts > 0, losses.sum(dim=1) / counts.clamp(min=1), torch.inf)  # a cut-off reply cannot win
        correct.append(bool(torch.isfinite(mean_loss[0])) and int(mean_loss.argmin()) == 0)
    model.train(was_training)
    return correct


# ---------------------------------------------------------------- the stage


Pairs = list[tuple[SourceCount, str, list[dict]]]  # (its source's count, record id, conversation)


def collect(ctx: StageContext) -> tuple[Pairs, Pairs, list[SourceCount]]:
    """Training and held-out pairs of every source, and what each source gave."""
    cfg: InstructConfig = ctx.section("instruct")
    data = ctx.inputs["dedup"]
    train_set, heldout, counts = [], [], []
    for source in cfg.sources:
        if source.kind == "builtin":
            count = SourceCount("built-in corpus (dedup artifact)", "builtin")
            got = builtin_conversations(data.files("train"), count)
            held = builtin_conversations(data.files("validation") + data.files("test"), count)
            if source.limit is not None and len(got) > source.limit:
                count.pairs -= len(got) - source.limit
                got = got[: source.limit]
        else:
            got, held, count = file_conversations(source, cfg.heldout_fraction)
        counts.append(count)
        train_set += [(count, i, c) for i, c in got]
        heldout += [(count, i, c) for i, c in held]
    if not train_set:
        raise UserError(no_pairs_message(counts))
    return train_set, heldout, counts


def no_pairs_message(counts: list[SourceCount]) -> str:
    lines = [c.nothing_usable() if c.kind != "builtin" else c.line() + " (pairs come from built-in corpus documents: "
             "ids stdlib:... and pydoc:...)" for c in counts]
    return "instruct: no training pairs.\n  " + "\n  ".join(lines)


def source_rejections(counts: list[SourceCount]) -> Counter:
    return sum((c.dropped for c in counts), Counter())


def pairs_spec(folder: Path, train: list, heldout: list, pad_id: int, cfg: InstructConfig) -> dict:
    """The encoded pairs written for torchrun workers, and the spec they build the same PairBatches from
    (models.data.batches_from_spec)."""
    (folder / "pairs.json").write_text(json.dumps({"train": train, "heldout": heldout}))
    return {"kind": "pairs", "path": str(folder / "pairs.json"), "pad_id": pad_id, "batch_size": cfg.batch_size,
            "grad_accum": cfg.grad_accum, "seed": cfg.seed, "eval_batches": cfg.eval_batches}


def run(ctx: StageContext) -> StageResult:
    from jielong.models.data import PairBatches  # torch: imported when the stage runs, not on a cache hit
    from jielong.models.train import loss_detail, pooled_loss, resolve_device, resolve_precision, row_losses

    cfg: InstructConfig = ctx.section("instruct")
    pretrained = ctx.inputs["pretrain"].path / "model"
    from jielong.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(pretrained)
    if not tokenizer.chat_template:
        raise UserError("instruct: the pretrained model's tokenizer has no chat template")
    model = load_model(pretrained)
    train_pairs, heldout_pairs, counts = collect(ctx)
    train_set, encoded = encode_trainable(train_pairs, tokenizer, cfg.max_length)
    heldout, encoded_heldout = encode_trainable(heldout_pairs, tokenizer, cfg.max_length)
    for count in counts:
        if count.kind != "builtin":  # a user's file: say what it gave (the built-in source's count is recorded)
            print(count.line(), flush=True)
    if not train_set:
        raise UserError(f"instruct: every training pair's prompt fills instruct.max_length ({cfg.max_length} tokens).\n  "
                        + "\n  ".join(c.line() for c in counts))
    sources = [c.as_dict() for c in counts]
    (ctx.out_dir / "sources.json").write_text(json.dumps(sources, indent=2, ensure_ascii=False))
    if cfg.objective == "replies":  # the same replies as plain text; held-out pairs stay in the chat format
        encoded = [encode_reply(c, tokenizer, cfg.max_length) for c in train_set]
    if cfg.flops_budget is not None:
        steps = steps_for_flops([len(ids) for ids, _ in encoded], cfg.batch_size, cfg.grad_accum, cfg.seed,
                                sum(p.numel() for p in model.parameters()), cfg.flops_budget)
        cfg = cfg.model_copy(update={"steps": steps, "warmup_steps": min(cfg.warmup_steps, steps - 1)})
    batches = PairBatches(encoded, encoded_heldout, tokenizer.pad_token_id, cfg.batch_size, cfg.grad_accum,
                          cfg.seed, cfg.eval_batches)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    shown = heldout[: cfg.generations]
    model.to(device)
    rows_before = row_losses(model, batches.validation(), device, precision)
    before_loss = pooled_loss(rows_before)
    before = generate_replies(model, tokenizer, shown, cfg.max_new_tokens, device)
    choices_before = response_choices(model, tokenizer, heldout, cfg, device, precision)

    trained = with_adapters(model, cfg.lora) if cfg.lora else model
    report = fit(ctx, trained, batches, lambda folder: pairs_spec(folder, encoded, encoded_heldout, tokenizer.pad_token_id, cfg),
                 cfg, "instruct")
    trainable = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    if cfg.lora:
        model = trained.merge_and_unload()
    after_loss = report.final_val_loss
    after = generate_replies(model, tokenizer, shown, cfg.max_new_tokens, device)
    choices_after = response_choices(model, tokenizer, heldout, cfg, device, precision)
    write_items(ctx.out_dir, heldout, rows_before, row_losses(model, batches.validation(), device, precision),
                choices_before, choices_after)
    save_hf_model(model, tokenizer, ctx.out_dir / "model", cfg.max_new_tokens)
    plot_curves(report, ctx.out_dir / "loss_curve.png", "instruction tuning (response tokens)",
                {"held-out loss before": before_loss})
    rows = [
        {"prompt": prompt_of(c)[-1]["content"], "reference": c[-1]["content"], "before": b, "after": a}
        for c, b, a in zip(shown, before, after)
    ]
    (ctx.out_dir / "generations.json").write_text(json.dumps(rows, indent=2, ensure_ascii=False))
    rejected = source_rejections(counts)
    result = StageResult(
        documents_in=sum(c.pairs + sum(c.dropped.values()) for c in counts), documents_out=len(train_set) + len(heldout),
        rejected_by_reason=dict(rejected), model_dir="model", register_as=cfg.register_as, model_task="llm/v1/chat",
        extra_artifacts=["loss_curve.png", "sources.json"],
        tables={"generations.json": rows},
    )
    result.metrics.update(report_metrics(report, sum(p.numel() for p in model.parameters())))
    result.metrics.update(
        heldout_response_loss_before=before_loss,
        heldout_response_loss_after=after_loss,
        heldout_response_perplexity_after=math.exp(min(after_loss, 50)),
        train_pairs=len(train_set),
        trainable_parameters=trainable,
        heldout_pairs=len(heldout),
        **compute_metrics(model, report.tokens),  # tokens of the padded batches: padding costs compute too
    )
    if choices_before is not None:
        result.metrics.update(heldout_choice_accuracy_before=sum(choices_before) / len(choices_before),
                              heldout_choice_accuracy_after=sum(choices_after) / len(choices_after),
                              heldout_choice_chance=1 / cfg.choice_candidates)
    pretraining = ctx.inputs["pretrain"].manifest["metrics"].get("train_flops")
    if pretraining:  # a pretrain artifact made before train_flops was recorded has none
        result.metrics["train_flops_over_pretrain"] = result.metrics["train_flops"] / pretraining
    result.details.update(sources=sources, device=report.device, precision=report.precision, **loss_detail(report), generations=rows,
                          tokens_seen=report.tokens)
    write_card(ctx, model, inherited_base(pretrained, "pretrain", ctx.inputs["pretrain"].key),
               {**result.metrics, "tokens_seen": report.tokens, "device": report.device, "precision": report.precision})
    return result


def write_items(folder: Path, heldout: list[list[dict]], loss_before: list, loss_after: list,
                choices_before: list[bool] | None, choices_after: list[bool] | None) -> None:
    """items.json: the held-out measures per pair (each reply's summed loss and token count, each prompt's
    choice), before and after training, so that a study resamples the pairs (tasks/lib/study/items.py).
    A pair's id is a digest of its conversation: the same pairs have the same ids in every variant."""
    ids = [xxhash.xxh64_hexdigest(json.dumps(c, sort_keys=True, ensure_ascii=False).encode()) for c in heldout]
    items = {"heldout_loss": {"ids": ids[: len(loss_before)], "before": loss_before, "after": loss_after}}
    if choices_before is not None:
        items["choice"] = {"ids": ids[: len(choices_before)], "before": choices_before, "after": choices_after}
    (folder / "items.json").write_text(json.dumps({"instruct": items}))


def with_adapters(model, lora):
    """The model with LoRA adapters (peft); only the adapters' parameters require gradients."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def sources_fingerprint(view) -> list:
    return [reader.fingerprint(Path(s.path)) if s.path else None for s in view.instruct.sources]


STAGE = Stage(name="instruct", version=VERSION, reads=("instruct",), inputs=("pretrain", "dedup"), run=run,
              external=sources_fingerprint)
