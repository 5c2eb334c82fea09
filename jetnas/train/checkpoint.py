"""Training checkpoints: safetensors only, written atomically, enough to resume bit-identically.

A checkpoint is a directory `step-00000123/` holding
- `model.safetensors`: the trainable parameters (frozen ones come from the model's source, not the checkpoint);
- `optimizer.safetensors`: the optimizer's per-parameter tensors (`state.<param>.<key>`);
- `rng.safetensors`: torch's CPU and CUDA generator states;
- `state.json`: step, data position, scheduler step, optimizer hyper-parameters, anything the caller adds; it is
  written last, so a directory without it is incomplete.
It is assembled as `step-00000123.partial` and renamed when complete, so an interrupted save never replaces the
previous checkpoint. Full (unsharded) state dicts come from torch.distributed.checkpoint's helpers, which handle
plain, DDP and FSDP2 models alike; rank 0 writes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

_STEP_DIR = re.compile(r"^step-(\d{8})$")
_OPTIONS = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def trainable_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in _unwrap(model).named_parameters() if p.requires_grad]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under `out_dir/checkpoints`, or None."""
    root = Path(out_dir) / "checkpoints"
    if not root.exists():
        return None
    done = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / "state.json").exists()]
    return max(done, key=lambda p: p.name, default=None)


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def save_checkpoint(out_dir: str | Path, step: int, model, optimizer, state: dict, keep: int = 2,
                    is_main: bool = True) -> Path | None:
    """Save a resumable checkpoint; all ranks must call it (gathering a sharded model is collective).

    Args:
        out_dir: the run's output directory (checkpoints go to `out_dir/checkpoints`).
        step: the number of optimizer steps done.
        model, optimizer: possibly DDP/FSDP-wrapped.
        state: JSON-serialisable extras (data position, scheduler, config...).
        keep: complete checkpoints kept (older ones are deleted after the new one is complete).
        is_main: only the main process writes.
    """
    names = set(trainable_names(model))
    model_state = {k: v for k, v in get_model_state_dict(model, options=_OPTIONS).items() if k in names}
    optim_state = get_optimizer_state_dict(model, optimizer, options=_OPTIONS)
    if not is_main:
        return None
    root = Path(out_dir) / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = root / f"step-{step:08d}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model_state.items()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    tensors, scalars = {}, {}
    for param, entries in optim_state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param}.{key}"] = value.contiguous()
            else:
                scalars[f"{param}.{key}"] = value
    save_file(tensors, str(tmp / "optimizer.safetensors"), metadata={"format": "pt"})
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, str(tmp / "rng.safetensors"))
    meta = {"step": step, "param_groups": optim_state["param_groups"], "optimizer_scalars": scalars, **state}
    (tmp / "state.json").write_text(json.dumps(meta, indent=2))
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.replace(final)
    complete = sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name))
    for old in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, model, optimizer) -> dict:
    """Restore trainable parameters, optimizer state and RNG states from a checkpoint; returns `state.json`."""
    path = Path(path)
    meta = json.loads((path / "state.json").read_text())
    weights = load_file(str(path / "model.safetensors"))
    missing = set(trainable_names(model)) - set(weights)
    if missing:
        raise ValueError(f"checkpoint {str(path)!r} lacks trainable parameters {sorted(missing)[:5]}... — was it "
                         f"written by a different model?")
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    tensors = load_file(str(path / "optimizer.safetensors"))
    state: dict[str, dict] = {}
    for key, value in tensors.items():
        param, name = key[len("state."):].rsplit(".", 1)
        state.setdefault(param, {})[name] = value
    for key, value in meta["optimizer_scalars"].items():
        param, name = key.rsplit(".", 1)
        state.setdefault(param, {})[name] = value
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": meta["param_groups"]},
                             options=StateDictOptions(full_state_dict=True))
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        cuda = [rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    return meta
