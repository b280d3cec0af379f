"""A Hugging Face causal LM as one ONNX graph: input_ids [batch, sequence] -> logits [batch, sequence, vocab],
both axes dynamic, no KV cache (a runtime recomputes the prefix, as `models.parity.greedy` does).

Exported with torch.onnx's dynamo exporter (the TorchScript one cannot translate transformers 5's
attention masks), weights inside the file (no external data: a model over 2 GB is refused).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np

from jielong.models.gguf_export import ExportError

ONNX_LIMIT = 2 * 1024**3  # protobuf's limit for one file


def write_onnx(model_dir: Path, out: Path) -> dict:
    """Write `out` (the caller makes it atomic); returns what was written, for the manifest."""
    import torch

    from jielong.models.presets import load_model

    model = load_model(model_dir).eval()
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    if size >= ONNX_LIMIT:
        raise ExportError(f"ONNX export keeps weights in one file, limited to 2 GB; this model has {size / 1e9:.1f} GB")
    context = model.config.max_position_embeddings
    example = torch.zeros((2, min(8, context)), dtype=torch.long)
    dynamic = {"input_ids": {0: torch.export.Dim("batch", min=1, max=1024),
                             1: torch.export.Dim("sequence", min=1, max=context)}}
    chatter = io.StringIO()  # the exporter prints its progress; a failure still raises with the reason
    quiet = logging.getLogger("torch.onnx")  # warns that torchvision's operators are not registered: none are used
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(chatter), torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's own deprecation notices, nothing about the model
            torch.onnx.export(logits_only(model).eval(), (example,), str(out), input_names=["input_ids"], output_names=["logits"],
                              dynamic_shapes=dynamic, dynamo=True, external_data=False, verbose=False)
    except Exception as err:  # the exporter's own errors name the operator it could not translate
        raise ExportError(f"ONNX export of {model.config.architectures[0]} failed: {str(err).splitlines()[0]}") from err
    finally:
        quiet.setLevel(level)
    return {"architecture": model.config.architectures[0], "inputs": {"input_ids": ["batch", "sequence"]},
            "outputs": {"logits": ["batch", "sequence", "vocab"]}, "max_sequence": context, "dtype": "float32"}


def logits_only(model):
    import torch

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            return self.model(input_ids=input_ids, use_cache=False).logits

    return Wrapper()


def onnx_logits(path: Path, optimizations: str = "basic"):
    """The exported graph in ONNX Runtime (CPU), as a models.parity.LogitsFn.

    `basic` graph optimizations only rewrite the graph exactly (constant folding, dead nodes); `all` adds
    ORT's fused kernels, which compute in another order: on SmolLM2-135M they double the float32
    difference to torch (1.6e-4 against 7.9e-5; torch float32 itself is 6e-5 off float64)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = {"basic": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                        "all": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL}[optimizations]
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(ids: np.ndarray) -> np.ndarray:
        return session.run(["logits"], {"input_ids": ids.astype(np.int64)})[0]

    return run


def check_dynamic_axes(logits_fn, ids: list[int]) -> None:
    """A batch of two rows and a shorter sequence give the same logits as one row: the axes are dynamic."""
    single = logits_fn(np.asarray([ids], dtype=np.int64))
    batch = logits_fn(np.asarray([ids, ids], dtype=np.int64))
    short = logits_fn(np.asarray([ids[: max(1, len(ids) // 2)]], dtype=np.int64))
    if batch.shape[0] != 2 or not np.allclose(batch[1], single[0], atol=1e-5) or short.shape[1] != max(1, len(ids) // 2):
        raise ExportError("the ONNX graph does not take a dynamic batch and sequence")
