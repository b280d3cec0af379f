"""The data artifacts a stage consumes, described as MLflow dataset inputs: name `<stage>-<group>`, the
producing stage's key as digest, the group's folder as source, its schema and row count. Only metadata is
read (Parquet footers, the manifest), never the data, so describing a large corpus costs nothing."""

from __future__ import annotations

import json
from dataclasses import dataclass

from jielong.tasks.core.contract import Artifact

# MLflow's column-spec types for the Arrow types the stages write; anything else is shown as a string
ARROW_TO_MLFLOW = {"string": "string", "large_string": "string", "int64": "long", "int32": "integer",
                   "double": "double", "float": "float", "bool": "boolean", "binary": "binary"}


@dataclass(frozen=True)
class DataInput:
    name: str
    digest: str
    source: str  # a file:// URI of the group's folder
    schema: str  # JSON, MLflow's {"mlflow_colspec": [...]}
    rows: int
    context: str  # the group: kept, train, validation, test

    def entity(self):
        """The MLflow DatasetInput of this dataset."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(name=self.name, digest=self.digest, source_type="local",
                          source=json.dumps({"uri": self.source}), schema=self.schema,
                          profile=json.dumps({"num_rows": self.rows}))
        return DatasetInput(dataset=dataset, tags=[InputTag("mlflow.data.context", self.context)])


def data_inputs(artifact: Artifact) -> list[DataInput]:
    """The datasets of an artifact: its Parquet groups, or the token splits of a tokenize artifact; none for
    a model."""
    groups = artifact.manifest.get("details", {}).get("data_groups") or []
    if groups:
        return [d for group in groups if (d := _parquet_group(artifact, group)) is not None]
    return _token_splits(artifact)


def consumed_inputs(artifacts: list[Artifact]) -> list[DataInput]:
    """The datasets of the artifacts a stage reads, each once."""
    seen: dict[tuple[str, str], DataInput] = {}
    for artifact in artifacts:
        for data in data_inputs(artifact):
            seen.setdefault((data.name, data.digest), data)
    return list(seen.values())


def _parquet_group(artifact: Artifact, group: str) -> DataInput | None:
    import pyarrow.parquet as pq

    files = [f for f in artifact.files(group) if f.suffix == ".parquet"]
    if not files:
        return None
    schema = pq.read_schema(files[0])
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    columns = [{"type": ARROW_TO_MLFLOW.get(str(field.type), "string"), "name": field.name, "required": not field.nullable}
               for field in schema]
    return DataInput(f"{artifact.stage}-{group}", artifact.key, files[0].parent.as_uri(),
                     json.dumps({"mlflow_colspec": columns}), rows, group)


def _token_splits(artifact: Artifact) -> list[DataInput]:
    """A tokenize artifact: one dataset per split, its rows the split's tokens (a flat array of ids)."""
    details = artifact.manifest.get("details", {})
    splits = details.get("splits") or {}
    out = []
    for split, counts in splits.items():
        path = artifact.path / "tokens" / f"{split}.bin"
        if not (isinstance(counts, dict) and path.is_file()):
            continue
        schema = {"mlflow_colspec": [{"type": "integer", "name": f"token_id ({details.get('dtype', 'uint16')})",
                                      "required": True}]}
        out.append(DataInput(f"{artifact.stage}-{split}", artifact.key, path.as_uri(), json.dumps(schema),
                             int(counts.get("tokens", 0)), split))
    return out
