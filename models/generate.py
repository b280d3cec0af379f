"""Sampling from a saved model: greedy, temperature, top-k, top-p, beam search."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable


def resolve_model(reference: str, tracking_uri: str | None = None, store: Path | None = None) -> Path:
    """A local model directory for models:/NAME/VERSION, runs:/RUN_ID/model, or any spec of
    models.imports.import_model (a folder, a hub name, a .gguf file, builtin:NAME; GGUFs are converted
    into `store`, by default the default workspace)."""
    from jielong.models.references import check_reference

    if reference.startswith(("models:/", "runs:/")):
        import mlflow

        from jielong.tasks.core.tracking import set_tracking_uri_for_this_process

        if tracking_uri:
            set_tracking_uri_for_this_process(tracking_uri)
        if reference.startswith("models:/"):  # a misspelt name gets the closest registered ones
            check_reference(reference, mlflow.MlflowClient(mlflow.get_tracking_uri()))
        try:
            downloaded = Path(mlflow.artifacts.download_artifacts(artifact_uri=reference))
        except Exception as err:  # MlflowException, or a missing registry
            raise ValueError(f"cannot resolve {reference} in the MLflow store {mlflow.get_tracking_uri()}: {err}") from None
        return hf_folder(downloaded)
    from jielong.models.imports import import_model
    from jielong.tasks.core.config import RunConfig

    check_reference(reference)

    return import_model(reference, store or Path(RunConfig.model_fields["workspace"].default).expanduser().resolve())


def hf_folder(path: Path) -> Path:
    """A Hugging Face folder for a downloaded model: as it is, or, for an MLflow transformers-flavor model
    (MLmodel, weights in model/, tokenizer in components/tokenizer/), both joined in `<path>/hf/` (hard
    links where the file system allows, else copies)."""
    import os
    import shutil

    if not (path / "MLmodel").is_file():
        return path
    joined = path / "hf"
    joined.mkdir(exist_ok=True)
    for part in (path / "model", path / "components" / "tokenizer"):
        for source in sorted(part.glob("*")) if part.is_dir() else []:
            target = joined / source.name
            if source.is_file() and not target.exists():
                try:
                    os.link(source, target)
                except OSError:
                    shutil.copy2(source, target)
    if (path / "README.md").is_file() and not (joined / "README.md").exists():
        shutil.copy2(path / "README.md", joined / "README.md")
    return joined


@dataclass(frozen=True)
class Decoding:
    """The decoding options of the GPT-2 demo in the course notes: greedy by default, sampling
    (temperature, top-k, top-p), or beam search with early stopping; no_repeat_ngram_size forbids any
    n-gram to appear twice in the output (what stops beams from looping)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    beams: int = 1
    no_repeat_ngram_size: int = 0
    seed: int = 1234

    def generate_kwargs(self, tokenizer, max_new_tokens: int) -> dict:
        sample = self.temperature > 0 or self.top_k is not None or self.top_p is not None
        kwargs = dict(max_new_tokens=max_new_tokens, num_beams=self.beams, do_sample=sample,
                      eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
        if self.beams > 1:
            kwargs["early_stopping"] = True  # the search ends once `beams` finished candidates exist
        if self.no_repeat_ngram_size:
            kwargs["no_repeat_ngram_size"] = self.no_repeat_ngram_size
        if sample:
            kwargs.update(temperature=self.temperature or 1.0, top_k=self.top_k or 0, top_p=self.top_p or 1.0)
        return kwargs


def generate(model_dir: Path, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, beams: int = 1, chat: bool = False,
             seed: int = 1234, device: str = "auto", no_repeat_ngram_size: int = 0) -> str:
    """One continuation of `prompt` (with `chat`, the reply to it as a user message in the model's template)."""
    generator = Generator(model_dir, device)
    decoding = Decoding(temperature, top_k, top_p, beams, no_repeat_ngram_size, seed)
    if chat:
        return generator.reply([{"role": "user", "content": prompt}], max_new_tokens, decoding)
    return generator.continue_text(prompt, max_new_tokens, decoding)


class Generator:
    """A loaded model and its tokenizer."""

    def __init__(self, model_dir: Path, device: str = "auto"):
        from jielong.models.presets import load_model
        from jielong.models.tokenizer import load_tokenizer
        from jielong.models.train import resolve_device

        self.device = resolve_device(device)
        self.tokenizer = load_tokenizer(model_dir)
        self.model = load_model(model_dir).to(self.device).eval()

    def continue_text(self, prompt: str, max_new_tokens: int, decoding: Decoding = Decoding()) -> str:
        import torch

        ids = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        ids = ids[:, -max(1, self.model.config.max_position_embeddings - max_new_tokens):].to(self.device)
        torch.manual_seed(decoding.seed)
        with torch.inference_mode():
            out = self.model.generate(ids, **decoding.generate_kwargs(self.tokenizer, max_new_tokens))
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    def reply(self, messages: list[dict], max_new_tokens: int, decoding: Decoding = Decoding()) -> str:
        """The assistant's next turn, the conversation rendered with the model's own chat template."""
        return self.continue_text(self.render(messages, max_new_tokens), max_new_tokens, decoding).strip()

    def render(self, messages: list[dict], max_new_tokens: int) -> str:
        """The prompt for the next reply; the oldest exchanges are left out when it outgrows the context
        (a system message stays)."""
        room = self.model.config.max_position_embeddings - max_new_tokens
        system = [m for m in messages[:1] if m["role"] == "system"]
        turns = messages[len(system):]
        while True:
            prompt = self.tokenizer.apply_chat_template(system + turns, add_generation_prompt=True, tokenize=False)
            if len(turns) <= 1 or len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"]) <= room:
                return prompt
            turns = turns[2:] if len(turns) > 2 else turns[1:]


def chat_loop(generator: Generator, read: Callable[[], str | None], write: Callable[[str], None],
              max_new_tokens: int = 128, decoding: Decoding = Decoding(), system: str | None = None,
              notice: Callable[[str], None] = lambda text: None) -> list[dict]:
    """Talk until `read()` gives None (end of input) or /quit; /reset starts a new conversation. `write`
    gets the replies only; `notice` what the loop itself says. Returns the conversation."""
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    while (line := read()) is not None:
        text = line.strip()
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            messages = list(start)
            notice("(new conversation)")
        elif text:
            messages.append({"role": "user", "content": text})
            messages.append({"role": "assistant", "content": generator.reply(messages, max_new_tokens, decoding)})
            write(messages[-1]["content"])
    return messages
