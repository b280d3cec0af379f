"""gguf_llama_cpp: load a GGUF that `jielong export` wrote in llama.cpp itself and compare it with the source model.

For each completion probe, llama.cpp (through llama-cpp-python) and transformers (the source folder, float32):
the prompt's token ids, the next-token log-probabilities after it (largest absolute difference) and a greedy
continuation of 16 tokens. Prints one line per probe and a summary line.

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

ROOT = Path(__file__).resolve().parent.parent


def log_softmax(logits: np.ndarray) -> np.ndarray:
    return logits - np.logaddexp.reduce(logits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("gguf", type=Path)
    parser.add_argument("source", type=Path, help="the model folder the GGUF was exported from")
    parser.add_argument("--probes", type=Path, default=ROOT / "data" / "eval" / "probes.jsonl")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()

    import torch
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    probes = [json.loads(line) for line in args.probes.read_text(encoding="utf-8").splitlines() if line.strip()]
    prompts = [(p["id"], p["prompt"]) for p in probes if p["kind"] == "completion"]
    # float32 KV cache: llama.cpp keeps it in float16 by default, which alone moves log-probs by ~1e-3
    llm = Llama(model_path=str(args.gguf), logits_all=True, n_ctx=512, verbose=False, seed=0, type_k=0, type_v=0)
    tokenizer = AutoTokenizer.from_pretrained(args.source)
    model = AutoModelForCausalLM.from_pretrained(args.source, dtype=torch.float32).eval()

    worst, same_ids, same_text = 0.0, 0, 0
    for probe_id, prompt in prompts:
        ids = tokenizer(prompt)["input_ids"]
        same_ids += ids == llm.tokenize(prompt.encode(), add_bos=False, special=False)
        llm.reset()
        llm.eval(ids)
        theirs = np.asarray(llm.scores[len(ids) - 1], dtype=np.float64)
        with torch.no_grad():
            ours = model(torch.tensor([ids])).logits[0, -1].double().numpy()
            greedy = model.generate(torch.tensor([ids]), max_new_tokens=args.max_new_tokens, do_sample=False)
        worst = max(worst, float(np.abs(log_softmax(theirs) - log_softmax(ours)).max()))
        text = llm.create_completion(prompt, max_tokens=args.max_new_tokens, temperature=0.0, top_k=1)["choices"][0]["text"]
        expected = tokenizer.decode(greedy[0, len(ids):], skip_special_tokens=True)
        same_text += text == expected
        print(f"{probe_id}: llama.cpp {text!r} | transformers {expected!r}")
    print(f"{args.gguf.name}: token ids equal {same_ids}/{len(prompts)}, greedy continuations equal "
          f"{same_text}/{len(prompts)}, max |delta next-token log-prob| {worst:.2e}")


if __name__ == "__main__":
    main()
