"""Atomic writes that concurrent writers cannot break.

Caches under `$JETNAS_CACHE` are filled by whichever process needs them first, and several may need them at once:
the ranks of one `torchrun` job, or two jobs sharing a cache. Each writer assembles its copy under a name no other
writer uses (`<name>.<pid>-<random>.partial`), then renames it into place. The rename is atomic, so a reader sees a
complete file or none, and as cached content is a pure function of its key, it does not matter which writer wins.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def temp_sibling(path: Path) -> Path:
    """A fresh name next to `path` (same filesystem, so renaming it onto `path` is atomic)."""
    return path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")


def write_text_atomic(path: Path, text: str) -> None:
    tmp = temp_sibling(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def publish_dir(tmp: Path, target: Path, complete: str) -> None:
    """Rename the directory `tmp` to `target`. If `target` already holds `complete` (another writer finished
    first), keep that copy and drop ours; an incomplete `target` (left by an older version) is replaced."""
    try:
        os.rename(tmp, target)
        return
    except OSError:
        if not target.exists():
            raise
    if (target / complete).exists():
        shutil.rmtree(tmp, ignore_errors=True)
        return
    shutil.rmtree(target, ignore_errors=True)
    try:
        os.rename(tmp, target)
    except OSError:
        if not (target / complete).exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
