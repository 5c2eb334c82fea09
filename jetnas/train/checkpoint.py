"""Training checkpoints and run folders: verified safetensors checkpoints, exact resume, one writer per folder.

A checkpoint is a directory `checkpoints/step-00000123/` holding
- `model.safetensors`: the trainable parameters (frozen ones come from the model's source, not the checkpoint);
- `optimizer.safetensors`: the optimizer's per-parameter tensors (`state.<param>.<key>`);
- `rng.safetensors`: torch's CPU and CUDA generator states;
- `state.json`: step, data position, optimizer hyper-parameters, anything the caller adds;
- `manifest.json`: the size and sha256 of each of those four files (`jetnas.manifest`), written last.
It is assembled as `step-00000123.partial`, every file fsynced, then renamed, so an interrupted save never replaces
or hides the previous checkpoint. Loading verifies the manifest; resuming (`choose_checkpoint`) walks back from the
newest checkpoint to the newest that verifies, and moves each damaged one it passes to `checkpoints/damaged/` with
a message saying why (truncated, missing, changed bytes). Rotation keeps the newest `keep` checkpoints and deletes
older ones only once the new one is complete and hashed, so it never deletes the only good checkpoint; a
checkpoint being deleted is first renamed `*.deleting`, so a kill mid-deletion leaves no half checkpoint behind.
Checkpoints written before manifests existed (`state.json`, no manifest) still load, after a structural check.
Nothing with a non-finite value is ever written (`check_finite`).

A run folder (`out_dir`) also holds
- `run.lock`: the pid, host and start time of the process writing it; a second writer is refused, a lock left by
  a dead process on this host is taken over with a message;
- `run.json`: the run's identity, the resolved arguments that change what it computes; resuming with other ones is
  refused, naming each (old -> new). `move_run_aside` (`--no-resume`) moves the old run to `old-runs/<time>/`.

Full (unsharded) state dicts come from torch.distributed.checkpoint's helpers, which handle plain, DDP and FSDP2
models alike; rank 0 writes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from jetnas.manifest import MANIFEST, fsync_dir, fsync_file, read_manifest, verify_manifest, write_manifest
from jetnas.validation import InputError, read_json, show

_STEP_DIR = re.compile(r"^step-(\d{8})$")
_OPTIONS = StateDictOptions(full_state_dict=True, cpu_offload=True)
CHECKPOINT_FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")
LOCK_FILE = "run.lock"
RUN_RECORD = "run.json"
#: state.json's "format": 2 since checkpoints carry a manifest (1, or no field: written before)
CHECKPOINT_FORMAT = 2
#: what `move_run_aside` moves: everything a training run writes into its folder (`model` is a stage's final model)
RUN_FILES = ("checkpoints", "log.jsonl", "log.replaced.jsonl", RUN_RECORD, "train_config.json", "model")


class CheckpointError(InputError):
    """A checkpoint that cannot be used (damaged, incomplete, or of another model)."""


class NonFiniteError(ValueError):
    """A NaN or infinity in a loss, gradient or weight. A `ValueError`, so the CLI prints it as one line."""


class RunLockedError(InputError):
    """Another live process is writing the run folder."""


class RunIdentityError(InputError):
    """A resume with arguments that differ from the run's."""


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def trainable_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in _unwrap(model).named_parameters() if p.requires_grad]


def all_finite(t: torch.Tensor) -> bool:
    """Whether a floating-point tensor holds no NaN or infinity. A NaN or infinity anywhere makes the sum NaN or
    infinite, so a finite sum proves every element finite in one read of the tensor, with no temporary (an
    `isfinite` mask and its reduction took 1.5 s of each 2-step candidate's checkpoint on one CPU thread,
    2026-12-07); only a non-finite sum (a NaN or infinity, or finite values whose sum overflows) is checked element
    by element."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def check_finite(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise `NonFiniteError` when a floating-point tensor of `tensors` holds a NaN or infinity, naming `what` and
    up to five such tensors with their counts. Call it before writing weights anywhere (`save_checkpoint` does; a
    final model directory must too)."""
    bad = []
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            local = t.to_local() if hasattr(t, "to_local") else t
            if all_finite(local):
                continue
            count = int((~torch.isfinite(local)).sum())
            if count:
                bad.append(f"{name} ({count} of {local.numel()})")
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise NonFiniteError(f"{what}: non-finite values in {', '.join(bad[:5])}{more}; not written")


# ---------------------------------------------------------------------------------------------------------------
# checkpoints


def checkpoint_dirs(out_dir: str | Path) -> list[Path]:
    """Every `step-XXXXXXXX` directory under `out_dir/checkpoints`, newest first (complete or not)."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _STEP_DIR.match(p.name) and p.is_dir()), key=lambda p: p.name,
                  reverse=True)


def _is_complete(path: Path) -> bool:
    return (path / MANIFEST).exists() or (path / "state.json").exists()


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under `out_dir/checkpoints` (its manifest, or for one written before
    manifests its state.json, exists), or None. It is not verified: `choose_checkpoint` does that."""
    return next((p for p in checkpoint_dirs(out_dir) if _is_complete(p)), None)


def _legacy_problem(path: Path) -> str | None:
    """Structural check of a checkpoint written before manifests: state.json parses, every safetensors header
    parses and covers its file (which catches truncation, not changed bytes)."""
    for name in CHECKPOINT_FILES:
        if not (path / name).exists():
            return f"{name} is missing"
    try:
        meta = read_json(path / "state.json")
    except InputError as err:
        return str(err)
    if meta.get("format", 1) >= CHECKPOINT_FORMAT:
        return f"{MANIFEST} is missing"  # written with one: it was deleted
    for name in CHECKPOINT_FILES[:3]:
        try:
            with safe_open(str(path / name), framework="pt"):
                pass
        except (SafetensorError, OSError) as err:
            return f"{name} is damaged ({err})"
    return None


def checkpoint_problem(path: str | Path) -> str | None:
    """None if the checkpoint at `path` can be trusted, else why not: the first file its manifest finds missing,
    truncated or changed, or a damaged/missing manifest. A checkpoint written before manifests (state.json, no
    manifest.json) gets a structural check instead (`_legacy_problem`)."""
    path = Path(path)
    if not path.is_dir():
        return "the checkpoint directory is missing"
    if not (path / MANIFEST).exists() and (path / "state.json").exists():
        return _legacy_problem(path)
    problem = verify_manifest(path)
    if problem is None:
        listed = set(read_manifest(path)[0]["files"])
        missing = [n for n in CHECKPOINT_FILES if n not in listed]
        if missing:
            return f"its manifest does not list {missing}"
    return problem


def quarantine(path: Path) -> Path:
    """Move a damaged checkpoint to `checkpoints/damaged/` (kept for inspection, out of resume's and rotation's
    way); returns its new path."""
    target_dir = path.parent / "damaged"
    target_dir.mkdir(exist_ok=True)
    target = target_dir / path.name
    n = 1
    while target.exists():
        target = target_dir / f"{path.name}.{n}"
        n += 1
    os.replace(path, target)
    return target


def choose_checkpoint(out_dir: str | Path, quarantine_damaged: bool = True) -> tuple[Path | None, list[tuple]]:
    """The newest checkpoint of `out_dir` that verifies, and `(path, reason, moved to)` of each newer one passed
    over (each moved to `checkpoints/damaged/` unless `quarantine_damaged` is False: moved to is then None). None
    when no checkpoint verifies. A `step-*` directory with neither manifest nor state.json is passed over too
    (emptied by something else: our saves publish complete directories by renaming)."""
    skipped = []
    for path in checkpoint_dirs(out_dir):
        problem = checkpoint_problem(path) if _is_complete(path) else "it is incomplete (no manifest.json)"
        if problem is None:
            return path, skipped
        skipped.append((path, problem, quarantine(path) if quarantine_damaged else None))
    return None, skipped


def clean_partials(out_dir: str | Path) -> None:
    """Remove what killed writers left under `out_dir/checkpoints`: `*.partial` (unpublished saves) and
    `*.deleting` (rotations cut short). Only the process holding the run's lock may call it."""
    root = Path(out_dir) / "checkpoints"
    if root.is_dir():
        for p in root.iterdir():
            if p.name.endswith((".partial", ".deleting")):
                shutil.rmtree(p, ignore_errors=True)


def _write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    save_file(tensors, str(path), metadata=metadata)
    fsync_file(path)


def _write_state(meta: dict, path: Path) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(meta, indent=2))
        f.flush()
        os.fsync(f.fileno())


def _remove(path: Path) -> None:
    """Delete a checkpoint directory: renamed out of the `step-*` namespace first, so a kill mid-deletion leaves a
    `*.deleting` directory (cleaned at the next start), never a half checkpoint that looks like one."""
    doomed = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.deleting")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _publish(tmp: Path, final: Path) -> None:
    """Rename the complete `tmp` to `final` (replacing an older directory of that name) and make it durable."""
    if final.exists():
        _remove(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def _rotate(root: Path, keep: int, newest: Path) -> None:
    """Delete all but the newest `keep` checkpoints; `newest`, just written and hashed, is always kept, so a good
    checkpoint is only deleted once a newer good one exists."""
    complete = sorted((p for p in root.iterdir() if _STEP_DIR.match(p.name)), key=lambda p: p.name)
    kept = set(complete[-keep:]) | {newest}
    for old in complete:
        if old not in kept and old.name < newest.name:
            _remove(old)


def save_checkpoint(out_dir: str | Path, step: int, model, optimizer, state: dict, keep: int = 2,
                    is_main: bool = True) -> Path | None:
    """Save a resumable, verified checkpoint; all ranks must call it (gathering a sharded model is collective).

    Args:
        out_dir: the run's output directory (checkpoints go to `out_dir/checkpoints`).
        step: the number of optimizer steps done.
        model, optimizer: possibly DDP/FSDP-wrapped.
        state: JSON-serialisable extras (data position, scheduler, config...).
        keep: checkpoints kept (older ones are deleted after the new one is complete; see `_rotate`).
        is_main: only the main process writes.

    Raises:
        NonFiniteError: a weight or optimizer value is NaN or infinite (nothing is written).
    """
    names = set(trainable_names(model))
    model_state = {k: v for k, v in get_model_state_dict(model, options=_OPTIONS).items() if k in names}
    optim_state = get_optimizer_state_dict(model, optimizer, options=_OPTIONS)
    if not is_main:
        return None
    tensors, scalars = {}, {}
    for param, entries in optim_state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param}.{key}"] = value.contiguous()
            else:
                scalars[f"{param}.{key}"] = value
    check_finite(model_state, f"checkpoint of step {step}: weights")
    check_finite(tensors, f"checkpoint of step {step}: optimizer state")
    root = Path(out_dir) / "checkpoints"
    final = root / f"step-{step:08d}"
    if final.exists() and checkpoint_problem(final) is None:
        # this step is saved already (a Ctrl-C right after a periodic save): the same run, so the same state; never
        # replace a good checkpoint, since a kill between removing it and publishing the new one could lose both
        return final
    tmp = root / f"step-{step:08d}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _write_safetensors({k: v.contiguous() for k, v in model_state.items()}, tmp / "model.safetensors",
                       {"format": "pt"})
    _write_safetensors(tensors, tmp / "optimizer.safetensors", {"format": "pt"})
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    _write_safetensors(rng, tmp / "rng.safetensors")
    meta = {"step": step, "param_groups": optim_state["param_groups"], "optimizer_scalars": scalars, **state,
            "format": CHECKPOINT_FORMAT}
    _write_state(meta, tmp / "state.json")
    write_manifest(tmp, list(CHECKPOINT_FILES), extra={"step": step})
    _publish(tmp, final)
    _rotate(root, keep, final)
    return final


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: cannot be read ({err})") from None


def load_checkpoint(path: str | Path, model, optimizer, verify: bool = True) -> dict:
    """Restore trainable parameters, optimizer state and RNG states from a checkpoint; returns its `state.json`.

    Args:
        verify: check the checkpoint's manifest first (`checkpoint_problem`); False when the caller just did
            (`choose_checkpoint`).

    Raises:
        CheckpointError: the checkpoint is damaged, or lacks parameters the model trains (another model's).
    """
    path = Path(path)
    if verify:
        problem = checkpoint_problem(path)
        if problem:
            raise CheckpointError(f"checkpoint {path} cannot be used: {problem}")
    meta = read_json(path / "state.json")
    for key in ("step", "param_groups", "optimizer_scalars"):
        if key not in meta:
            raise CheckpointError(f"{path / 'state.json'}: no {key!r} field (not a jetnas checkpoint?)")
    weights = _load_tensors(path / "model.safetensors")
    missing = set(trainable_names(model)) - set(weights)
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks trainable parameters {sorted(missing)[:5]}: was it written "
                              f"by a different model?")
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    tensors = _load_tensors(path / "optimizer.safetensors")
    state: dict[str, dict] = {}
    for key, value in tensors.items():
        param, name = key[len("state."):].rsplit(".", 1)
        state.setdefault(param, {})[name] = value
    for key, value in meta["optimizer_scalars"].items():
        param, name = key.rsplit(".", 1)
        state.setdefault(param, {})[name] = value
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": meta["param_groups"]},
                             options=StateDictOptions(full_state_dict=True))
    rng = _load_tensors(path / "rng.safetensors")
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        cuda = [rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    return meta


# ---------------------------------------------------------------------------------------------------------------
# the run folder: lock, identity, moving an old run aside


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (Linux /proc; None elsewhere or when gone): with
    the pid it names one process, even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces; fields after it are plain
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] in ("Z", "X") else fields[19]


def _holder_alive(record: dict) -> bool | None:
    """Whether the process that wrote a lock record still runs: True/False on this host, None on another (its
    processes cannot be checked from here)."""
    if record.get("host") != socket.gethostname():
        return None
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    if Path("/proc").is_dir():
        start = _process_start(pid)
        if start is None or (record.get("start") is not None and start != record["start"]):
            return False  # a zombie, or the pid now belongs to another process
    return True


def _lock_record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid()),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _read_lock(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def _create_exclusive(path: Path, record: dict) -> bool:
    """Create `path` holding `record` unless it exists: a hard link of a complete temporary file, so the lock is
    never seen empty; O_EXCL creation where hard links are not supported."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")
    tmp.write_text(json.dumps(record))
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(record))
        return True
    finally:
        tmp.unlink(missing_ok=True)


def acquire_run_lock(out_dir: str | Path) -> Path:
    """Take `out_dir/run.lock` for this process, or raise `RunLockedError` naming the live holder (pid, host,
    since when). A lock whose holder is dead (this host: no such process, or the pid now runs another program) is
    taken over with a message; one held by this very process is kept."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    mine = _lock_record()
    for _ in range(5):
        if _create_exclusive(path, mine):
            return path
        holder = _read_lock(path)
        if holder is not None and holder.get("pid") == mine["pid"] and holder.get("host") == mine["host"] \
                and holder.get("start") == mine["start"]:
            return path
        alive = _holder_alive(holder) if holder is not None else False
        if alive is None:
            raise RunLockedError(f"{out} is locked by pid {holder.get('pid')} on host {holder.get('host')!r} "
                                 f"(since {holder.get('since')}), which cannot be checked from here: if that "
                                 f"process is gone, delete {path}")
        if alive:
            raise RunLockedError(f"{out} is being written by another jetnas process (pid {holder.get('pid')} on "
                                 f"this host, since {holder.get('since')}): two writers would corrupt the run; "
                                 f"wait for it or stop it")
        stale = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.stale")
        try:
            os.replace(path, stale)
        except FileNotFoundError:
            continue  # another process took the stale lock over first: try again
        stale.unlink(missing_ok=True)
        what = (f"pid {holder.get('pid')} (since {holder.get('since')}), no longer running" if holder is not None
                else "an unreadable lock file")
        print(f"jetnas: {out}: taking over the lock of {what}", file=sys.stderr)
    raise RunLockedError(f"{out}: could not take {path} (other processes keep taking it)")


def release_run_lock(out_dir: str | Path) -> None:
    """Remove `out_dir/run.lock` if this process holds it."""
    path = Path(out_dir) / LOCK_FILE
    holder = _read_lock(path)
    if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


def _normalise(value):
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def read_run_identity(out_dir: str | Path) -> dict | None:
    """The identity recorded in `out_dir/run.json`, or None when there is none."""
    path = Path(out_dir) / RUN_RECORD
    if not path.exists():
        return None
    record = read_json(path)
    if not isinstance(record.get("identity"), dict):
        raise InputError(f"{path}: identity={show(record.get('identity'))}: must be an object")
    return record["identity"]


def write_run_identity(out_dir: str | Path, identity: dict) -> None:
    from jetnas.manifest import write_json_durably

    write_json_durably(Path(out_dir) / RUN_RECORD, {"identity": _normalise(identity),
                                                     "written": time.strftime("%Y-%m-%d %H:%M:%S")})


def identity_changes(old: Mapping, new: Mapping) -> list[str]:
    """`"name old -> new"` for each argument whose value differs (or is set on one side only)."""
    old, new = _normalise(dict(old)), _normalise(dict(new))
    unset = "(unset)"
    return [f"{k} {show(old.get(k, unset), 40)} -> {show(new.get(k, unset), 40)}"
            for k in sorted(set(old) | set(new)) if old.get(k, unset) != new.get(k, unset)]


def move_run_aside(out_dir: str | Path) -> Path | None:
    """Move the run files of `out_dir` (`RUN_FILES`) to `out_dir/old-runs/<time>/`; returns that folder, or None
    when there was nothing to move. Nothing is deleted. Only the lock holder may call it."""
    out = Path(out_dir)
    present = [out / name for name in RUN_FILES if (out / name).exists()]
    if not present:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = out / "old-runs" / stamp
    n = 1
    while target.exists():
        target = out / "old-runs" / f"{stamp}.{n}"
        n += 1
    target.mkdir(parents=True)
    for path in present:
        os.replace(path, target / path.name)
    fsync_dir(out)
    return target
