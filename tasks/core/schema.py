"""The base of every config section: unknown keys are errors, not silently ignored.

A setting that cannot change what a stage writes (logging cadence, registry names, checkpoint
cadence) is declared with `json_schema_extra=NO_OUTPUT`: a stage may read it, but it stays out of
the stage's cache key (tasks/core/contract.py), so changing it reruns nothing.

A setting added after artifacts were already keyed without it, and whose default reproduces the
old behaviour exactly, is declared with `json_schema_extra=KEYED_WHEN_SET`: it enters a key only
when it differs from its default. Every key stays injective (a missing entry means the default),
and the keys of configs that leave the setting alone stay what they were, so their cached
artifacts stay valid (e.g. `pretrain.distributed`: `none` trains exactly as before it existed).
"""

from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic.fields import FieldInfo

NO_OUTPUT = {"affects_output": False}
KEYED_WHEN_SET = {"key_omits_default": True}


class UserError(ValueError):
    """A user mistake (bad config, missing input, nothing usable): shown as a message, not a traceback."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)  # a default 3 is 3.0 in a float field, as in YAML


def affects_output(info: FieldInfo) -> bool:
    extra = info.json_schema_extra
    return not (isinstance(extra, dict) and extra.get("affects_output") is False)


def keyed(info: FieldInfo, value: Any) -> bool:
    """Whether a setting's value enters a key: never for NO_OUTPUT, not at its default for KEYED_WHEN_SET."""
    extra = info.json_schema_extra
    if isinstance(extra, dict) and extra.get("key_omits_default") and value == info.default:
        return False
    return affects_output(info)


def output_fields(value: Any) -> Any:
    """The JSON form of a config value without its NO_OUTPUT settings (at any depth) and its KEYED_WHEN_SET
    settings left at their defaults: what a key hashes."""
    from pydantic_core import to_jsonable_python

    if isinstance(value, BaseModel):
        return {name: output_fields(getattr(value, name))
                for name, info in type(value).model_fields.items() if keyed(info, getattr(value, name))}
    if isinstance(value, (list, tuple)):
        return [output_fields(v) for v in value]
    if isinstance(value, dict):
        return {str(k): output_fields(v) for k, v in value.items()}
    return to_jsonable_python(value)
