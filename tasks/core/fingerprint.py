"""Content fingerprints of the files a stage reads outside its input artifacts.

A key covers what a file holds, not where or when it was written: touching a file or copying the
workspace keeps its keys, editing one byte changes them. Digests are xxh3-128 of the bytes, cached
per process by (path, size, mtime, inode) so `jielong stages` does not hash a corpus twice.
"""

from __future__ import annotations

import os
from pathlib import Path

import xxhash

MISSING = "missing"
_CHUNK = 1 << 20
_memo: dict[tuple, str] = {}


def content_digest(path: Path) -> str:
    """xxh3-128 of a file's bytes, or "missing" when it cannot be read (the stage then says why)."""
    try:
        status = os.stat(path)
        memo_key = (str(Path(path).resolve()), status.st_size, status.st_mtime_ns, status.st_ino)
        if memo_key in _memo:
            return _memo[memo_key]
        digest = xxhash.xxh3_128()
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    except OSError:
        return MISSING
    _memo[memo_key] = digest.hexdigest()
    return _memo[memo_key]


def tree_files(root: Path) -> list[Path]:
    """Every file at or under `root`, sorted; a missing root gives []."""
    if root.is_dir():
        return sorted(p for p in root.rglob("*") if p.is_file())
    return [root] if root.exists() else []


def fingerprint_files(files: list[tuple[str, Path]]) -> list[list[str]]:
    """[(name the stage knows the file by, content digest)] — the name matters when it ends up in ids."""
    return [[name, content_digest(path)] for name, path in files]


def fingerprint_tree(path: Path) -> list[list[str]] | str:
    """A file or folder by content, names relative to it; "missing" when nothing is there."""
    root = Path(path).expanduser()
    if not root.exists():
        return MISSING
    if root.is_file():
        return fingerprint_files([(root.name, root)])
    return fingerprint_files([(p.relative_to(root).as_posix(), p) for p in tree_files(root)])
