"""What a --model reference names, checked before anything loads, with the closest known names when it
names nothing: registered models (models:/NAME/VERSION or @ALIAS), builtin:NAME, folders and GGUF files."""

from __future__ import annotations

from pathlib import Path

from jielong.models.imports import BUILTIN_MODELS, HUB_NAME
from jielong.tasks.core.suggest import closest, did_you_mean

LISTING = "`jielong models` lists the registered models"


def check_reference(reference: str, client=None) -> None:
    """A ValueError naming the closest known references when `reference` names nothing; `client` (an
    MlflowClient) is needed for models:/ references. A hub name is not checked: that needs the network."""
    if reference.startswith("models:/"):
        check_registered(reference, client)
    elif reference.startswith("builtin:"):
        name = reference.removeprefix("builtin:")
        if name not in BUILTIN_MODELS:
            raise ValueError(f"unknown builtin model {name!r}.{did_you_mean(name, BUILTIN_MODELS)} "
                             f"Known: {', '.join(f'builtin:{n}' for n in sorted(BUILTIN_MODELS))}")
    elif not reference.startswith("runs:/") and not Path(reference).expanduser().exists() \
            and not HUB_NAME.match(reference):
        raise ValueError(missing_path_message(reference))


def check_registered(reference: str, client) -> None:
    """models:/NAME/VERSION or models:/NAME@ALIAS exists in the registry of `client`."""
    spec = reference.removeprefix("models:/").strip("/")
    name, alias = spec.split("@", 1) if "@" in spec else (spec.split("/", 1)[0], None)
    version = None if alias is not None or "/" not in spec else spec.split("/", 1)[1]
    names = [m.name for m in client.search_registered_models(max_results=1000)]
    if name not in names:
        close = closest(name, names)
        hint = f" Did you mean: {', '.join(f'models:/{n}' for n in close)}?" if close else ""
        known = f" Registered: {', '.join(sorted(names))}." if names else " No model is registered there yet."
        raise ValueError(f"no registered model {name!r} in {client.tracking_uri}.{hint}{known} {LISTING}")
    model = client.get_registered_model(name)
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    if alias is not None and alias not in (model.aliases or {}):
        aliases = ", ".join(sorted(model.aliases or {})) or "none"
        raise ValueError(f"registered model {name!r} has no alias {alias!r}.{did_you_mean(alias, model.aliases or {})} "
                         f"Aliases: {aliases}; versions: {', '.join(map(str, versions))}")
    if version is not None and version.isdigit() and int(version) not in versions:  # (latest, stage names: MLflow's)
        raise ValueError(f"registered model {name!r} has no version {version}; versions: "
                         f"{', '.join(map(str, versions)) or 'none'}. {LISTING}")


def missing_path_message(reference: str) -> str:
    """A folder or GGUF file that does not exist: the model folders and GGUF files beside where it would be,
    and the builtin models, closest first."""
    path = Path(reference).expanduser()
    parent = path.parent if path.parent.is_dir() else Path(".")
    beside = {}
    for entry in sorted(parent.iterdir()) if parent.is_dir() else []:
        if (entry.is_dir() and (entry / "config.json").is_file()) or entry.suffix.lower() == ".gguf":
            beside[entry.name] = str(entry) if reference.startswith(("/", "~")) else _relative(entry, reference)
    known = {**beside, **{n: f"builtin:{n}" for n in BUILTIN_MODELS}}
    close = [known[n] for n in closest(path.name, known)]
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    if path.suffix.lower() == ".gguf":
        return f"{path}: no such GGUF file.{hint}"
    return (f"{reference!r} is neither a local model folder or .gguf file, nor a hub name (ORG/NAME), nor "
            f"builtin:NAME, nor models:/NAME/VERSION.{hint}")


def _relative(entry: Path, reference: str) -> str:
    prefix = "./" if reference.startswith("./") else ""
    return prefix + str(entry) if not str(entry).startswith("./") else str(entry)
