"""Does a converted model compute what its source computes? Probes, next-token log-probabilities and
greedy continuations, for any runtime that maps token ids to logits.

A runtime is a `LogitsFn`: int64 ids of shape [batch, sequence] -> float logits [batch, sequence, vocab].
Greedy decoding recomputes the whole sequence at every step (no cache), so the same loop serves torch,
ONNX Runtime and a re-imported GGUF alike, and any difference comes from the weights or the graph.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from jielong.tasks.core.resources import shipped_dir
from jielong.tasks.core.schema import UserError

LogitsFn = Callable[[np.ndarray], np.ndarray]
PROBE_KINDS = ("completion", "chat")


def default_probes_path() -> Path:
    return shipped_dir("eval_tasks") / "probes.jsonl"


@dataclass(frozen=True)
class Probe:
    id: str
    prompt: str
    kind: str = "completion"  # "chat": the prompt is a user message in the model's chat template


def load_probes(path: Path | None = None) -> list[Probe]:
    """The probe set of a JSON-lines file (default: data/eval/probes.jsonl): {"id", "prompt", "kind"}."""
    path = Path(path) if path else default_probes_path()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise UserError(f"cannot read the probe set {path}: {err.strerror or err}") from None
    probes = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            probe = Probe(str(row["id"]), str(row["prompt"]), str(row.get("kind", "completion")))
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(f"{path}:{number}: not a probe (a JSON object with id and prompt): {err}") from None
        if probe.kind not in PROBE_KINDS:
            raise UserError(f"{path}:{number}: kind {probe.kind!r} is not one of {', '.join(PROBE_KINDS)}")
        probes.append(probe)
    if not probes:
        raise UserError(f"the probe set {path} is empty")
    if len({p.id for p in probes}) != len(probes):
        raise UserError(f"the probe set {path} repeats an id")
    return probes


def probe_text(tokenizer, probe: Probe) -> str:
    """The text a model continues for a probe: a chat probe in the model's own template (a model without
    one gets the bare message)."""
    if probe.kind == "chat" and tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": probe.prompt}], add_generation_prompt=True,
                                             tokenize=False)
    return probe.prompt


def probe_ids(tokenizer, probe: Probe) -> list[int]:
    return list(tokenizer(probe_text(tokenizer, probe), add_special_tokens=False)["input_ids"])


def torch_logits(model) -> LogitsFn:
    """A transformers causal LM as a LogitsFn (no KV cache: every call sees the whole sequence)."""
    import torch

    def run(ids: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(input_ids=torch.from_numpy(ids), use_cache=False).logits.float().numpy()

    return run


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def greedy(logits_fn: LogitsFn, ids: list[int], max_new_tokens: int, eos_id: int | None) -> list[int]:
    """The greedy continuation of `ids` (ties to the lowest id, as argmax), stopping after EOS."""
    sequence = list(ids)
    for _ in range(max_new_tokens):
        token = int(np.argmax(logits_fn(np.asarray([sequence], dtype=np.int64))[0, -1]))
        sequence.append(token)
        if token == eos_id:
            break
    return sequence[len(ids):]


def compare(source: LogitsFn, target: LogitsFn, prompts: dict[str, list[int]], max_new_tokens: int,
            eos_id: int | None) -> dict:
    """Parity of `target` against `source` on the probes (id -> token ids): the largest absolute
    difference of next-token log-probabilities at every prompt position, and whether greedy
    continuations are equal (each probe's tokens listed when they differ)."""
    rows = []
    for probe_id, ids in prompts.items():
        batch = np.asarray([ids], dtype=np.int64)
        diff = float(np.abs(log_softmax(source(batch)) - log_softmax(target(batch))).max())
        expected = greedy(source, ids, max_new_tokens, eos_id)
        got = greedy(target, ids, max_new_tokens, eos_id)
        row = {"id": probe_id, "prompt_tokens": len(ids), "max_abs_logprob_diff": diff, "greedy_equal": expected == got}
        if expected != got:
            row.update(source_tokens=expected, export_tokens=got)
        rows.append(row)
    return {
        "max_abs_logprob_diff": max(r["max_abs_logprob_diff"] for r in rows),
        "greedy_equal": all(r["greedy_equal"] for r in rows),
        "greedy_differs": [r["id"] for r in rows if not r["greedy_equal"]],
        "max_new_tokens": max_new_tokens,
        "probes": rows,
    }
