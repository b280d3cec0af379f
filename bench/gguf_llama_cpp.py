"""gguf_llama_cpp: load a GGUF that `jielong export` wrote in llama.cpp itself and compare it with the source model.

The same parity check as the export's manifest (models/parity.py: the probe set, next-token log-probabilities at
every prompt position, greedy continuations), with llama.cpp (through llama-cpp-python) as the runtime in place of
jielong's GGUF import, plus whether llama.cpp's own tokenizer gives the prompts' token ids.

Usage (repository root; llama-cpp-python is not a dependency: `pip install llama-cpp-python` builds llama.cpp
from source, about 5 minutes on 2 cores):
    .venv/bin/jielong export MODEL_FOLDER --to gguf --type f32 --out /tmp/model.f32.gguf
    .venv/bin/python bench/gguf_llama_cpp.py /tmp/model.f32.gguf MODEL_FOLDER [--probes data/eval/probes.jsonl]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from jielong.models.parity import LogitsFn, compare, load_probes, probe_ids, probe_text, torch_logits


def llama_cpp_logits(llm) -> LogitsFn:
    """llama.cpp as a LogitsFn: the whole sequence evaluated afresh on each call, as parity.greedy expects."""

    def run(ids: np.ndarray) -> np.ndarray:
        llm.reset()
        llm.eval([int(i) for i in ids[0]])
        return np.asarray(llm.scores[: ids.shape[1]], dtype=np.float32)[None]

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("gguf", type=Path)
    parser.add_argument("source", type=Path, help="the model folder the GGUF was exported from")
    parser.add_argument("--probes", type=Path, default=None, help="probe set, JSON lines (default: data/eval/probes.jsonl)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()

    import torch
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.source)
    model = AutoModelForCausalLM.from_pretrained(args.source, dtype=torch.float32).eval()
    # float32 KV cache: llama.cpp keeps it in float16 by default, which alone moves log-probs by ~1e-3
    llm = Llama(model_path=str(args.gguf), logits_all=True, n_ctx=512, verbose=False, seed=0, type_k=0, type_v=0)
    probes = load_probes(args.probes)
    prompts = {p.id: probe_ids(tokenizer, p) for p in probes}
    same_ids = sum(prompts[p.id] == llm.tokenize(probe_text(tokenizer, p).encode(), add_bos=False, special=True)
                   for p in probes)
    parity = compare(torch_logits(model), llama_cpp_logits(llm), prompts, args.max_new_tokens, tokenizer.eos_token_id)
    for row in parity["probes"]:
        print(json.dumps(row))
    print(f"{args.gguf.name}: token ids equal {same_ids}/{len(probes)}, greedy continuations equal "
          f"{len(probes) - len(parity['greedy_differs'])}/{len(probes)}, max |delta next-token log-prob| "
          f"{parity['max_abs_logprob_diff']:.2e} (every prompt position)")


if __name__ == "__main__":
    main()
