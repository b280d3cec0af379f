"""Does the endpoint answer what the model computes in process? Probes sent with bounded concurrency,
answers compared with in-process greedy decoding, latency percentiles and errors measured.

Answers are compared with surrounding whitespace stripped (servers differ in whether the reply keeps
its leading space); anything else that differs is a differing probe.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jielong.models.parity import Probe
from jielong.tasks.lib.deploy.endpoint import Answer, Endpoint


@dataclass(frozen=True)
class Reference:
    """The model in process: its greedy answer to each probe, and the probes' perplexity scorer."""

    answers: dict[str, str]
    generator: object = field(repr=False)

    def perplexity(self, probes: list[Probe], answers: dict[str, str]) -> float:
        """exp(mean negative log-likelihood) of the answers' tokens after their prompts, under this model
        (empty answers carry no tokens); nan when no answer has a token."""
        from jielong.models.parity import log_softmax, probe_ids

        tokenizer, model = self.generator.tokenizer, self.generator.model
        total, count = 0.0, 0
        for probe in probes:
            text = answers.get(probe.id)
            if not text:
                continue
            prompt = probe_ids(tokenizer, probe)
            answer = tokenizer(text, add_special_tokens=False)["input_ids"]
            room = model.config.max_position_embeddings - len(prompt)
            answer = answer[:max(0, room)]
            if not answer:
                continue
            logits = logits_of(model, prompt + answer)
            logprobs = log_softmax(logits[len(prompt) - 1:-1])
            total -= float(logprobs[np.arange(len(answer)), answer].sum())
            count += len(answer)
        return math.exp(total / count) if count else float("nan")


def logits_of(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float().numpy()


def reference(model_dir: Path, probes: list[Probe], max_new_tokens: int) -> Reference:
    """Greedy answers of the model in process, decoded as servers decode them (special tokens skipped)."""
    from jielong.models.generate import Generator

    generator = Generator(model_dir, "cpu")
    answers = {}
    for probe in probes:
        if probe.kind == "chat" and generator.tokenizer.chat_template:
            answers[probe.id] = generator.reply([{"role": "user", "content": probe.prompt}], max_new_tokens)
        else:
            answers[probe.id] = generator.continue_text(probe.prompt, max_new_tokens)
    return Reference(answers, generator)


def send(endpoint: Endpoint, probes: list[Probe], max_new_tokens: int, rounds: int, concurrency: int) -> list[Answer]:
    """Each probe `rounds` times, at most `concurrency` requests in flight."""
    jobs = [probe for _ in range(rounds) for probe in probes]
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        return list(pool.map(lambda probe: endpoint.ask(probe, max_new_tokens), jobs))


def same(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and a.strip() == b.strip()


def figures(answers: list[Answer], expected: dict[str, str]) -> dict:
    """Latency percentiles of the answered requests, the error rate, and the probes whose answers differ
    from `expected` (a probe differs when any of its answered requests does)."""
    seconds = [a.seconds for a in answers if a.error is None]
    differing = sorted({a.probe for a in answers if a.error is None and not same(a.text, expected[a.probe])})
    answered = {a.probe for a in answers if a.error is None}
    return {
        "requests": len(answers),
        "errors": sum(a.error is not None for a in answers),
        "error_rate": sum(a.error is not None for a in answers) / len(answers) if answers else 1.0,
        "latency_p50_s": float(np.percentile(seconds, 50)) if seconds else float("nan"),
        "latency_p95_s": float(np.percentile(seconds, 95)) if seconds else float("nan"),
        "probes_answered": len(answered),
        "probes_differing": differing,
        "changed_share": len(differing) / len(answered) if answered else float("nan"),
    }


def answers_table(answers: list[Answer], expected: dict[str, str]) -> list[dict]:
    return [{"probe": a.probe, "expected": expected[a.probe], "answer": a.text, "equal": same(a.text, expected[a.probe]),
             "seconds": round(a.seconds, 4), "error": a.error} for a in answers]
