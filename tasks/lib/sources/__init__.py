"""Source kinds: where documents come from. One module per kind, found through KINDS.

Each kind module defines `Config` (a pydantic model with a `kind: Literal[...]` tag) and
    check(source, where)            fail early, with a clear message, on a source that cannot be read
    plan(source, job_bytes, options)  the source's work as a list of picklable jobs (one Prefect task each),
                                    naming files by absolute path (workers may run in another directory)
    records(source, job, options)   the documents and rejections of one job, streamed
    fingerprint(source)             what the records depend on (file contents, Python version): the ingest key
Adding a kind is one new module and one entry in KINDS. Files of every format are read by one
hardened reader (reader.py), which instruct's sources, in-context task data and extra perplexity
sets use too.
"""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from jielong.tasks.lib.sources import builtin, files, hf

KINDS = {"builtin": builtin, "files": files, "hf": hf}

BuiltinSource, FilesSource, HFSource = builtin.Config, files.Config, hf.Config
Source = Annotated[Union[tuple(kind.Config for kind in KINDS.values())], Field(discriminator="kind")]


def kind_of(source):
    """The module implementing a source's kind (a config object or its JSON form)."""
    return KINDS[source["kind"] if isinstance(source, dict) else source.kind]
