"""Atomic writes that concurrent writers cannot break.

Caches under `$JETNAS_CACHE` are filled by whichever process needs them first, and several may need them at once:
the ranks of one `torchrun` job, or two jobs sharing a cache. Each writer assembles its copy under a name no other
writer uses (`<name>.<pid>-<random>.partial`), then renames it into place. The rename is atomic, so a reader sees a
complete file or none, and as cached content is a pure function of its key, it does not matter which writer wins.

Correct is not yet economical: eight ranks would each tokenise the corpus (or generate the teacher's text). So a
builder also holds `build_lock(target)`: the first process builds while the others wait, then find it built.
"""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def build_lock(target: Path) -> Iterator[None]:
    """Held while this process builds `target` (an exclusive `flock` on `<target>.lock`); another process asking
    for it waits until the builder is done, so check whether `target` exists after entering. Where locks are not
    available (no `fcntl`, a filesystem without `flock`) it holds nothing: writers then duplicate work, and the
    atomic renames still keep the cache whole."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl

        f = open(target.with_name(target.name + ".lock"), "a")  # noqa: SIM115 - closed below, which unlocks
    except (ImportError, OSError):  # no fcntl, or a cache we may read but not write
        yield
        return
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"jetnas: waiting for another process to build {target.name}", file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        f.close()
