"""`jielong export`: a model folder as GGUF or ONNX, with its parity against the source in a manifest.

    <out>            the export (model.gguf / model.onnx)
    <out>.json       manifest: format, type, source, sizes, timings, and parity on the probe set:
                     the largest |difference| of next-token log-probabilities over every prompt
                     position, and whether greedy continuations equal the source's, per probe

The GGUF is read back through jielong's own GGUF import (models/imports.py), the ONNX graph through
ONNX Runtime with its exact (basic) graph optimizations, the figures with all of them (fused kernels)
recorded beside; both are compared with the source model in torch on the same token ids. Both files are
written under temporary names next to `out` and renamed into place only after the parity check
passed, so a failure leaves nothing behind. A float32 export must match within FLOAT32_TOLERANCE with
equal greedy continuations, else it fails; float16 and quantized GGUFs record their figures.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from jielong.models.gguf_export import ExportError, write_gguf
from jielong.models.parity import Probe, compare, probe_ids, torch_logits

FORMATS = ("gguf", "onnx")
FLOAT32_TOLERANCE = 1e-4


def manifest_path(out: Path) -> Path:
    return out.with_name(out.name + ".json")


def export_model(model_dir: Path, fmt: str, out: Path, probes: list[Probe], dtype: str = "f32", source: str = "",
                 max_new_tokens: int = 16) -> dict:
    """Write `out` and its manifest; returns the manifest."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "onnx" and dtype != "f32":
        raise ExportError(f"ONNX export writes float32 only (asked: {dtype})")
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp_manifest = tmp.with_name(tmp.name + ".json")
    try:
        started = time.perf_counter()
        about = write_gguf(model_dir, tmp, dtype, name=source or None) if fmt == "gguf" else write_onnx_file(model_dir, tmp)
        written = time.perf_counter() - started
        parity = check_parity(model_dir, fmt, tmp, probes, max_new_tokens)
        must_match = dtype == "f32"
        if must_match and not (parity["max_abs_logprob_diff"] <= FLOAT32_TOLERANCE and parity["greedy_equal"]
                               and parity["tokenizer_equal"]):
            raise ExportError(parity_failure(fmt, parity))
        manifest = {
            "format": fmt, "type": dtype, "source": source, "model_dir": str(model_dir), "file": out.name,
            "bytes": tmp.stat().st_size, "export_seconds": round(written, 3),
            "parity_seconds": round(time.perf_counter() - started - written, 3),
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "parity": {**parity, "tolerance": FLOAT32_TOLERANCE if must_match else None,
                       "checked": must_match},
            **about,
        }
        tmp_manifest.write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
        os.replace(tmp, out)
        os.replace(tmp_manifest, manifest_path(out))
        return manifest
    finally:
        for leftover in (tmp, tmp_manifest):
            leftover.unlink(missing_ok=True)


def write_onnx_file(model_dir: Path, out: Path) -> dict:
    from jielong.models.onnx_export import write_onnx

    return write_onnx(model_dir, out)


def parity_failure(fmt: str, parity: dict) -> str:
    reasons = []
    if parity["max_abs_logprob_diff"] > FLOAT32_TOLERANCE:
        reasons.append(f"log-probabilities differ by up to {parity['max_abs_logprob_diff']:.2e} (> {FLOAT32_TOLERANCE:g})")
    if not parity["greedy_equal"]:
        reasons.append(f"greedy continuations differ on {', '.join(parity['greedy_differs'])}")
    if not parity["tokenizer_equal"]:
        reasons.append(f"the exported tokenizer splits {', '.join(parity['tokenizer_differs'])} differently")
    return f"the {fmt} export does not compute what the source does: {'; '.join(reasons)}; nothing was written"


def check_parity(model_dir: Path, fmt: str, exported: Path, probes: list[Probe], max_new_tokens: int) -> dict:
    """Parity of the exported file against the source model, on the probes' token ids."""
    from jielong.models.presets import load_model
    from jielong.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    prompts = {p.id: probe_ids(tokenizer, p) for p in probes}
    source = torch_logits(load_model(model_dir).eval())
    if fmt == "onnx":
        from jielong.models.onnx_export import check_dynamic_axes, onnx_logits

        target = onnx_logits(exported, "basic")
        check_dynamic_axes(target, next(iter(prompts.values())))
        fused = compare(source, onnx_logits(exported, "all"), prompts, max_new_tokens, tokenizer.eos_token_id)
        return {**compare(source, target, prompts, max_new_tokens, tokenizer.eos_token_id),
                "tokenizer_equal": True, "tokenizer_differs": [],
                "read_back_with": "onnxruntime (basic graph optimizations)",
                "onnxruntime_all_optimizations": {k: fused[k] for k in ("max_abs_logprob_diff", "greedy_equal")}}
    with tempfile.TemporaryDirectory(prefix="jielong-gguf-readback-") as store:
        from jielong.models.imports import import_model

        folder = import_model(str(exported), Path(store))
        read_back = load_tokenizer(folder)
        differs = [p.id for p in probes if probe_ids(read_back, p) != prompts[p.id]]
        result = compare(source, torch_logits(load_model(folder).eval()), prompts, max_new_tokens, tokenizer.eos_token_id)
    return {**result, "tokenizer_equal": not differs, "tokenizer_differs": differs, "read_back_with": "jielong GGUF import"}
