"""Atomic writes that concurrent writers cannot break, and the one place jetnas writes a file atomically.

Every record a run reads back (pipeline.json, a stage's stage_config.json, a search's result.json, eval.json,
the super-network's files, a saved model directory) is written here: assembled under another name, then renamed
into place, so an interrupted run leaves the old file or the new one, never half of one.

Caches under `$JETNAS_CACHE` are filled by whichever process needs them first, and several may need them at once:
the ranks of one `torchrun` job, or two jobs sharing a cache. Each writer assembles its copy under a name no other
writer uses (`<name>.<pid>-<random>.partial`), then renames it into place. The rename is atomic, so a reader sees a
complete file or none, and as cached content is a pure function of its key, it does not matter which writer wins.

Correct is not yet economical: eight ranks would each tokenise the corpus (or generate the teacher's text). So a
builder also holds `build_lock(target)`: the first process builds while the others wait, then find it built.
"""

from __future__ import annotations

import json
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


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary sibling of `path` for the caller to write (`save_file(state, tmp)`); renamed onto `path` when the
    block ends without an error, removed when it raises."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, value) -> None:
    """`value` as indented JSON (anything json cannot encode written as its `str`), atomically."""
    write_text_atomic(path, json.dumps(value, indent=2, default=str))


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """A fresh directory `<target>.partial` for the caller to fill; when the block ends without an error it replaces
    `target` (an existing `target` is removed first), so a reader never finds a half-written directory. For a
    directory one process writes (a saved model); caches that several writers fill use `publish_dir`. A partial
    directory left by a crash is removed by the next write: a model's weights are too big to leave behind."""
    target = Path(target)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    yield partial
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)


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
