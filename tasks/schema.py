"""The base of every config section: unknown keys are errors, not silently ignored.

A setting that cannot change what a stage writes (logging cadence, registry names, checkpoint
cadence) is declared with `json_schema_extra=NO_OUTPUT`: a stage may read it, but it stays out of
the stage's cache key (tasks/contract.py), so changing it reruns nothing.
"""

from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic.fields import FieldInfo

NO_OUTPUT = {"affects_output": False}


class UserError(ValueError):
    """A user mistake (bad config, missing input, nothing usable): shown as a message, not a traceback."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)  # a default 3 is 3.0 in a float field, as in YAML


def affects_output(info: FieldInfo) -> bool:
    extra = info.json_schema_extra
    return not (isinstance(extra, dict) and extra.get("affects_output") is False)


def output_fields(value: Any) -> Any:
    """The JSON form of a config value without its NO_OUTPUT settings (at any depth): what a key hashes."""
    from pydantic_core import to_jsonable_python

    if isinstance(value, BaseModel):
        return {name: output_fields(getattr(value, name))
                for name, info in type(value).model_fields.items() if affects_output(info)}
    if isinstance(value, (list, tuple)):
        return [output_fields(v) for v in value]
    if isinstance(value, dict):
        return {str(k): output_fields(v) for k, v in value.items()}
    return to_jsonable_python(value)
