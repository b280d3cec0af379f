"""The `hf` source kind: a Hugging Face dataset by hub name (needs network) or a local
`datasets.save_to_disk` folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Literal

from pydantic import Field

from jielong.tasks.core.schema import Strict
from jielong.tasks.core.shards import reject
from jielong.tasks.lib.sources import reader
from jielong.tasks.lib.sources.reader import FileOptions, record_document


class HFSource(Strict):
    """A Hugging Face dataset by hub name (needs network) or a local path (load_from_disk / files)."""

    kind: Literal["hf"] = "hf"
    name: str
    subset: str | None = None
    split: str = "train"
    text_column: str = "text"
    limit: int | None = Field(None, ge=1)


def check(source: HFSource, where: str) -> None:
    """A hub name is checked when it is read (offline, it becomes one counted rejection)."""


def plan(source: HFSource, job_bytes: int, options: FileOptions) -> list[Any]:
    """One job; a local dataset by absolute path (workers may run in another directory), a hub name as is."""
    local = Path(source.name).expanduser()
    return [str(local.absolute()) if local.exists() else None]


def records(source: HFSource, job: Any, options: FileOptions) -> Iterator[dict]:
    origin = f"hf:{source.name}" + (f"/{source.subset}" if source.subset else "") + f":{source.split}"
    try:
        dataset = _load(source, job)
        for number, record in enumerate(dataset):
            if source.limit and number >= source.limit:
                break
            yield record_document({"id": f"{origin}#{number}", "source": origin, "record": record},
                                  source.text_column, None, options.max_chars)
    except Exception as err:  # datasets raises many types: offline, not found, bad split, ...
        yield reject({"id": origin, "source": origin}, "unreadable_source", f"{type(err).__name__}: {err}"[:2000])


def _load(source: HFSource, local: str | None = None):
    import datasets

    path = Path(local or source.name).expanduser()
    if path.is_dir() and any((path / f).exists() for f in ("state.json", "dataset_dict.json", "dataset_info.json")):
        loaded = datasets.load_from_disk(str(path))
        return loaded[source.split] if isinstance(loaded, datasets.DatasetDict) else loaded
    return datasets.load_dataset(local or source.name, source.subset, split=source.split, streaming=True)


def fingerprint(source: HFSource) -> Any:
    """A local folder by content; a hub dataset by name (pin a revision in the name to make it exact)."""
    local = Path(source.name).expanduser()
    return reader.fingerprint(local) if local.exists() else source.name


Config = HFSource
