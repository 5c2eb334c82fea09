"""Carry a trained hybrid between device machines, exactly, in what a call can bring back and carry in.

A device call returns at most 8 files of 16 MiB and carries at most 64 MiB, and the machine is lost ~30 s after its
last call, so a run had to train, evaluate and benchmark on one machine in one session (issue 19, item 4). That keeps
the shortest useful session at ~1,100 s (stage 1, stage 2 and the evaluations). This tool lets a run stop after a
stage and go on in a later session: only the tensors the training changed come back, exactly.

- `pack --model DIR --out OUT` (on the device): rebuilds the model the stage started from, the teacher converted
  with the directory's layer types and block options (seed 0, so anyone rebuilds the same one), and keeps every
  tensor of the trained model that differs from it, in float32 as trained (`carried.safetensors`, split into parts
  of `--part-mib`). Stage 1 trains only the token mixers: 47.1M of the SmolLM2-135M hybrid's 155.1M parameters
  (counted on its conversion), so 188 MB in 12 parts by arithmetic (not yet packed on a device), instead of 620 MB
  for the whole model in float32, or 310 MB in bfloat16, which would not be the model that trained. `manifest.json` records the base's recipe, the sha256 of the carried file and a digest of
  the trained model's whole state; `modelfiles.tar` the directory's other files (config, tokenizer, jetnas_stage).
- `stage --from DIR --to .stage` (here): checks the returned parts against the manifest and lays them out as
  staging folders `.stage/m0, m1, ...` of `--per-folder` parts each (m0 with the manifest and the model files), to
  carry as `cp -r .stage/mK/. /root/stage/` one call each.
- `unpack --parts /root/stage/mparts --out DIR` (on the next machine): rebuilds the same base, puts the carried
  tensors in, checks the whole state's digest against the manifest (any difference is an error: nothing
  approximate reaches a run) and writes the model directory atomically, with the original's other files.

`dev/gpu_session.sh modelback:N` and `modelin` run the device sides; dev/LOG.md (2026-12-07, sixteenth session).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tarfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PARTS = "mparts"  # the folder the parts live in, on both sides


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict's names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def base_model(teacher: str, layer_types: list[str], block_config: dict | None) -> torch.nn.Module:
    """The teacher converted with these layers, float32, new blocks seeded with 0: the same tensors on any machine
    (the conversion copies the teacher's weights; only new blocks draw from the seed)."""
    from jetnas.models.convert import convert_model
    from jetnas.train.stages import load_stage_teacher

    source = load_stage_teacher(teacher, "cpu")
    torch.manual_seed(0)
    model, _ = convert_model(source.model, list(layer_types), block_config or None, freeze=False)
    return model.float().eval()


def _recipe(model_dir: Path) -> dict:
    meta_path = model_dir / "jetnas_stage.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{model_dir}: no jetnas_stage.json (not a model directory a jetnas stage wrote)")
    meta = json.loads(meta_path.read_text())
    # the teacher as the stage was given it (a registry name, or a path whose base name jetnas_stage.json records)
    config = Path(meta.get("stage_config") or "")
    teacher = json.loads(config.read_text()).get("teacher") if config.is_file() else None
    return {"teacher": teacher or meta["teacher"], "layer_types": meta["layer_types"],
            "block_config": meta.get("block_config")}


def pack(model_dir: str | Path, out: str | Path, part_bytes: int = 15 << 20) -> dict:
    """See the module docstring. Returns the manifest."""
    from safetensors.torch import save_file

    from jetnas.models.hf_compat import load_pretrained

    model_dir, out = Path(model_dir), Path(out)
    recipe = _recipe(model_dir)
    trained = load_pretrained(model_dir, dtype=torch.float32).state_dict()
    base = base_model(**recipe).state_dict()
    if set(trained) != set(base):
        raise ValueError(f"{model_dir}: its tensors are not those of its recipe's conversion: "
                         f"{sorted(set(trained) ^ set(base))[:8]}")
    carried = {k: v.detach().cpu().clone().contiguous() for k, v in trained.items() if not torch.equal(v, base[k])}
    (out / PARTS).mkdir(parents=True, exist_ok=True)
    whole = out / "carried.safetensors"
    save_file(carried, whole, metadata={"format": "pt"})
    data = whole.read_bytes()
    parts = [data[i : i + part_bytes] for i in range(0, len(data), part_bytes)]
    for i, chunk in enumerate(parts):
        (out / PARTS / f"mpart.{i:02d}").write_bytes(chunk)
    with tarfile.open(out / "modelfiles.tar", "w") as tar:
        for f in sorted(model_dir.iterdir()):
            if f.is_file() and not f.name.endswith(".safetensors") and not f.name.endswith(".safetensors.index.json"):
                tar.add(f, arcname=f.name)
    manifest = {**recipe, "seed": 0, "digest": state_digest(trained), "tensors": len(trained),
                "carried": len(carried), "carried_values": sum(v.numel() for v in carried.values()),
                "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "parts": len(parts),
                "part_bytes": part_bytes, "source": str(model_dir)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    whole.unlink()
    return manifest


def _assemble(parts_dir: Path, manifest: dict) -> bytes:
    names = [parts_dir / f"mpart.{i:02d}" for i in range(manifest["parts"])]
    missing = [n.name for n in names if not n.exists()]
    if missing:
        raise FileNotFoundError(f"{parts_dir}: parts {missing} of {manifest['parts']} are missing")
    data = b"".join(n.read_bytes() for n in names)
    if hashlib.sha256(data).hexdigest() != manifest["sha256"]:
        sizes = {n.name: n.stat().st_size for n in names}
        raise ValueError(f"{parts_dir}: the parts joined do not match the manifest's sha256 (sizes {sizes}; "
                         f"each but the last should be {manifest['part_bytes']})")
    return data


def stage(source: str | Path, to: str | Path, per_folder: int = 2) -> list[Path]:
    """Check the returned parts (in `source`, flat or under mparts/) and lay them out as `to/m0, m1, ...`."""
    source, to = Path(source), Path(to)
    manifest = json.loads((source / "manifest.json").read_text())
    parts_dir = source / PARTS if (source / PARTS).is_dir() else source
    _assemble(parts_dir, manifest)
    folders = []
    for k in range(0, manifest["parts"], per_folder):
        folder = to / f"m{k // per_folder}"
        if folder.exists():
            shutil.rmtree(folder)
        (folder / PARTS).mkdir(parents=True)
        for i in range(k, min(k + per_folder, manifest["parts"])):
            shutil.copy2(parts_dir / f"mpart.{i:02d}", folder / PARTS / f"mpart.{i:02d}")
        folders.append(folder)
    for name in ("manifest.json", "modelfiles.tar"):
        shutil.copy2(source / name, folders[0] / PARTS / name)
    return folders


def unpack(parts_dir: str | Path, out: str | Path) -> dict:
    """See the module docstring. Returns the manifest."""
    from safetensors.torch import load

    from jetnas.files import atomic_dir

    parts_dir, out = Path(parts_dir), Path(out)
    manifest = json.loads((parts_dir / "manifest.json").read_text())
    carried = load(_assemble(parts_dir, manifest))
    model = base_model(manifest["teacher"], manifest["layer_types"], manifest["block_config"])
    state = model.state_dict()
    unknown = sorted(set(carried) - set(state))
    if unknown:
        raise ValueError(f"carried tensors the base model lacks: {unknown[:8]}")
    reshaped = sorted(k for k, v in carried.items() if v.shape != state[k].shape)
    if reshaped:
        raise ValueError(f"carried tensors whose shapes the base model's differ from: {reshaped[:8]}")
    with torch.no_grad():
        for name, value in carried.items():
            state[name].copy_(value)
    digest = state_digest(model.state_dict())
    if digest != manifest["digest"]:
        raise ValueError(f"the rebuilt model's state digest {digest[:16]} is not the trained one's "
                         f"{manifest['digest'][:16]}: the base (teacher {manifest['teacher']!r}, its conversion) differs "
                         f"on this machine")
    with atomic_dir(out) as partial:
        model.save_pretrained(partial)
        with tarfile.open(parts_dir / "modelfiles.tar") as tar:
            tar.extractall(partial, filter="data")  # the original config, tokenizer and jetnas_stage.json
    return manifest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("pack")
    a.add_argument("--model", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--part-mib", type=float, default=15)
    b = sub.add_parser("stage")
    b.add_argument("--from", dest="source", required=True)
    b.add_argument("--to", default=str(ROOT / ".stage"))
    b.add_argument("--per-folder", type=int, default=2)
    c = sub.add_parser("unpack")
    c.add_argument("--parts", required=True)
    c.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.command == "pack":
        m = pack(args.model, args.out, int(args.part_mib * (1 << 20)))
        print(f"packed {m['carried']} of {m['tensors']} tensors ({m['carried_values']:,} values, {m['bytes']:,} bytes) "
              f"in {m['parts']} parts; digest {m['digest'][:16]}")
    elif args.command == "stage":
        folders = stage(args.source, args.to, args.per_folder)
        print("staging folders: " + " ".join(str(f) for f in folders))
    else:
        m = unpack(args.parts, args.out)
        print(f"{args.out}: {m['carried']} carried tensors on the rebuilt base; digest {m['digest'][:16]} matches")
    return 0


if __name__ == "__main__":
    sys.exit(main())
