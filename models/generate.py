"""Sampling from a saved model: greedy, temperature, top-k, top-p, beam search."""

from __future__ import annotations

from pathlib import Path


def resolve_model(reference: str, tracking_uri: str | None = None, store: Path | None = None) -> Path:
    """A local model directory for models:/NAME/VERSION, runs:/RUN_ID/model, or any spec of
    models.imports.import_model (a folder, a hub name, a .gguf file, builtin:NAME; GGUFs are converted
    into `store`, by default the default workspace)."""
    if reference.startswith(("models:/", "runs:/")):
        import mlflow

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        try:
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=reference))
        except Exception as err:  # MlflowException, or a missing registry
            raise ValueError(f"cannot resolve {reference} in the MLflow store {mlflow.get_tracking_uri()}: {err}") from None
    from models.imports import import_model
    from tasks.config import PipelineConfig

    return import_model(reference, store or Path(PipelineConfig.model_fields["workspace"].default).expanduser().resolve())


def generate(model_dir: Path, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, beams: int = 1, chat: bool = False,
             seed: int = 1234, device: str = "auto") -> str:
    import torch

    from models.presets import load_model
    from models.tokenizer import load_tokenizer
    from models.train import resolve_device

    device = resolve_device(device)
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir).to(device).eval()
    if chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = ids[:, -max(1, model.config.max_position_embeddings - max_new_tokens):].to(device)
    sample = temperature > 0 or top_k is not None or top_p is not None
    options = dict(max_new_tokens=max_new_tokens, num_beams=beams, do_sample=sample,
                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if sample:
        options.update(temperature=temperature or 1.0, top_k=top_k or 0, top_p=top_p or 1.0)
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(ids, **options)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
