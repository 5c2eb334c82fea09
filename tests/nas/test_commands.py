"""`jetnas supernet` then `jetnas search placement`, end to end on CPU with a tiny teacher saved to disk."""

import json

import pytest
import torch

from jetnas.cli import main
from tests.utils import _CORPUS, save_tiny_llama

L = 4


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    save_tiny_llama(out, num_layers=L)
    return out


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_supernet_runs_of_one_seed_start_from_the_same_weights(teacher_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    text = tmp_path / "train.txt"
    text.write_text(_CORPUS * 6)
    runs = []
    for name in ("a", "b"):
        torch.manual_seed(len(name) * 7 + ord(name))  # whatever the caller's RNG holds
        assert main(["supernet", "--teacher", str(teacher_dir), "--data", str(text), "--steps", "1", "--batch-size",
                     "2", "--seq-len", "16", "--heldout-tokens", "128", "--out-dir", str(tmp_path / name),
                     "--device", "cpu", "--seed", "3"]) == 0
        capsys.readouterr()
        runs.append(load_file(tmp_path / name / "linear.safetensors"))
    assert runs[0].keys() == runs[1].keys()
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key


@pytest.mark.slow
def test_supernet_then_placement_search_from_the_cli(teacher_dir, tmp_path, capsys):
    text = tmp_path / "train.txt"
    text.write_text(_CORPUS * 6)
    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps({"question": f"Q{i}: which colour is the sky?", "choices": ["blue", "green"],
                                      "label": 0}) + "\n" for i in range(4)))
    run = tmp_path / "supernet"
    args = ["supernet", "--teacher", str(teacher_dir), "--data", str(text), "--steps", "8", "--batch-size", "4",
            "--seq-len", "32", "--heldout-tokens", "256", "--lr", "3e-3", "--swa-window", "8", "--out-dir", str(run),
            "--device", "cpu"]
    assert main(args) == 0
    summary = last_json(capsys)
    assert summary["out_dir"] == str(run) and summary["linear"] == "gla"
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) >= 2 and losses[-1] < losses[0]
    assert (run / "supernet.json").exists() and (run / "linear.safetensors").exists() and (run / "heldout.bin").exists()

    # the same command again resumes from the final checkpoint: nothing left to train, same super-network
    assert main(args) == 0
    assert last_json(capsys)["steps"] == 8

    out = tmp_path / "search"
    assert main(["search", "placement", "--supernet", str(run), "--budget", "attn=1,swa=1",
                 "--tasks", f"lm,mc:{mc},retrieval", "--beam-width", "2", "--rows", "2", "--lm-tokens", "128",
                 "--retrieval-length", "128", "--batch-size", "2", "--out-dir", str(out), "--device", "cpu"]) == 0
    result = last_json(capsys)
    placement, layer_types = result["placement"], result["layer_types"].split(",")
    assert len(placement["attn"]) == 1 and len(placement["swa"]) == 1 and placement["attn"] != placement["swa"]
    assert len(layer_types) == L and layer_types.count("attn") == 1 and layer_types.count("swa") == 1
    best = json.loads((out / "placements.json").read_text())["ranked"][0]
    assert (best["attn"], best["swa"]) == (placement["attn"], placement["swa"])
    for name in ("heatmap.png", "comparison.md"):
        assert (out / name).stat().st_size > 0


@pytest.mark.slow(seconds=50)
def test_supernet_under_torchrun_ddp_and_fsdp_agree(teacher_dir, tmp_path):
    """`jetnas supernet` on two gloo processes, DDP and FSDP2, and in one process: the same losses, and DDP and FSDP
    the same trained linear branches. Until 2026-12-02
    FSDP crashed here: the teacher's layers were sharded one by one, but the super-network calls their parts
    directly, so nothing gathered them; and the saved branches would have been the ranks' shards."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    text = tmp_path / "train.txt"
    text.write_text(_CORPUS * 6)
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    runs = {}
    for mode in ("ddp", "fsdp"):  # --standalone: torchrun picks a free port
        out = tmp_path / mode
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               "-m", "jetnas.cli", "supernet", "--teacher", str(teacher_dir), "--data",
                               str(text), "--steps", "3", "--batch-size", "4", "--seq-len", "16", "--heldout-tokens",
                               "128", "--device", "cpu", "--distributed", mode, "--out-dir", str(out)],
                              env=env, capture_output=True, text=True, timeout=600, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        runs[mode] = ([r["loss"] for r in log if "loss" in r], load_file(out / "linear.safetensors"))
    # one process under torchrun still runs the wrapped code path (a single-GPU check of it): same as a plain run
    for name, launch in (("plain", []), ("fsdp1", ["-m", "torch.distributed.run", "--standalone",
                                                     "--nproc-per-node", "1"])):
        out = tmp_path / name
        extra = ["--distributed", "fsdp"] if launch else []
        proc = subprocess.run([sys.executable, *launch, "-m", "jetnas.cli", "supernet", "--teacher", str(teacher_dir),
                               "--data", str(text), "--steps", "3", "--batch-size", "4", "--seq-len", "16",
                               "--heldout-tokens", "128", "--device", "cpu", *extra, "--out-dir", str(out)],
                              env=env, capture_output=True, text=True, timeout=600, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        log = (out / "log.jsonl").read_text().splitlines()
        runs[name] = [json.loads(line)["loss"] for line in log if "loss" in line]
    assert torch.allclose(torch.tensor(runs["plain"]), torch.tensor(runs["fsdp1"]), rtol=1e-5)
    # two half batches on two ranks: the whole batch's loss (the hidden term is a mean of per-sequence terms)
    assert torch.allclose(torch.tensor(runs["plain"]), torch.tensor(runs["ddp"][0]), rtol=1e-4)
    (ddp_losses, ddp_weights), (fsdp_losses, fsdp_weights) = runs["ddp"], runs["fsdp"]
    assert len(ddp_losses) == 3
    assert torch.allclose(torch.tensor(ddp_losses), torch.tensor(fsdp_losses), rtol=1e-5)
    assert ddp_weights.keys() == fsdp_weights.keys()
    for key in ddp_weights:
        assert torch.allclose(ddp_weights[key], fsdp_weights[key], rtol=1e-4, atol=1e-6), key
