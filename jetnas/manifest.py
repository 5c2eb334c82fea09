"""Checksum manifests: a directory's `manifest.json` lists the size and sha256 of each file it vouches for, so a
truncated, missing or altered file is caught before it is trusted (training checkpoints, the teacher cache).

sha256, not a faster hash: hashlib's SHA-256 runs at 1.45 GB/s on our CPU box (SHA-NI), against 0.75 GB/s for
BLAKE2b, the other strong hash in the standard library (measured on 256 MB in 8 MB chunks); BLAKE3 would be faster
but is one more dependency. At 1.45 GB/s a 135M-parameter stage-2 checkpoint (weights + two Adam moments in
float32, 1.6 GB) hashes in about 1.1 s, less than writing it takes; a 2B one (24 GB) in about 17 s. The files of a
directory are hashed in parallel threads (hashlib releases the GIL).

The manifest is written last and atomically (a temporary name, fsync, rename), so a directory whose manifest exists
was complete when it was written; verifying it says whether it still is.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MANIFEST = "manifest.json"
ALGORITHM = "sha256"
_CHUNK = 8 << 20


def file_digest(path: str | Path) -> str:
    """The sha256 of a file, read in 8 MB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def _digests(directory: Path, names: list[str]) -> dict[str, str]:
    with ThreadPoolExecutor(max_workers=max(1, min(4, len(names)))) as pool:
        return dict(zip(names, pool.map(lambda n: file_digest(directory / n), names)))


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (creations, renames) durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a filesystem or platform that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_durably(path: Path, value) -> None:
    """Write `value` as JSON to `path` atomically: a temporary name, fsync, rename, fsync of the directory."""
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w") as f:
        f.write(json.dumps(value, indent=2))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_manifest(directory: str | Path, names: list[str] | None = None, extra: dict | None = None) -> dict:
    """Hash `names` (default: every file of `directory` but the manifest) and write `directory/manifest.json`
    durably; returns the manifest. The files must be complete (and fsynced, if they must survive a power cut)."""
    directory = Path(directory)
    if names is None:
        names = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name != MANIFEST
                       and not p.name.endswith(".partial"))
    digests = _digests(directory, names)
    manifest = {"format": 1, "algorithm": ALGORITHM, **(extra or {}),
                "files": {n: {"bytes": (directory / n).stat().st_size, ALGORITHM: digests[n]} for n in names}}
    write_json_durably(directory / MANIFEST, manifest)
    return manifest


def read_manifest(directory: str | Path) -> tuple[dict | None, str | None]:
    """`(manifest, None)`, or `(None, why it cannot be used)`."""
    path = Path(directory) / MANIFEST
    if not path.exists():
        return None, f"{MANIFEST} is missing"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return None, f"{MANIFEST} is damaged ({err})"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or manifest.get("algorithm") != ALGORITHM or not all(
            isinstance(v, dict) and isinstance(v.get("bytes"), int) and isinstance(v.get(ALGORITHM), str)
            for v in files.values()):
        return None, f"{MANIFEST} is damaged (not a {ALGORITHM} manifest)"
    return manifest, None


def verify_manifest(directory: str | Path) -> str | None:
    """None when every file the manifest lists is present with its size and sha256; otherwise why not, naming the
    first bad file ("optimizer.safetensors is truncated (1024 of 4096 bytes)", "model.safetensors does not match its
    sha256 (bytes changed)", "state.json is missing", "manifest.json is missing")."""
    directory = Path(directory)
    manifest, problem = read_manifest(directory)
    if problem:
        return problem
    files = manifest["files"]
    for name, entry in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size < entry["bytes"]:
            return f"{name} is truncated ({size} of {entry['bytes']} bytes)"
        if size != entry["bytes"]:
            return f"{name} has {size} bytes, its manifest says {entry['bytes']}"
    digests = _digests(directory, list(files))
    for name, entry in files.items():
        if digests[name] != entry[ALGORITHM]:
            return f"{name} does not match its {ALGORITHM} (bytes changed)"
    return None
