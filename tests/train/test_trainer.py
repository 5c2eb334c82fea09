"""The trainer on tiny models: it learns, it resumes bit-identically, its checkpoints are what they claim, its
data is deterministic and sharded exactly, and torchrun (gloo, 2 processes) matches one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from jetnas.train.checkpoint import latest_checkpoint
from jetnas.train.data import TokenStream, WindowBatcher, resolve_data, teacher_generated
from jetnas.train.trainer import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[2]


def lm_loss(model, batch, step):
    ids = batch["input_ids"]
    out = model(input_ids=ids[:, :-1])
    logits = out.logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
    return loss, {"ppl": loss.exp().item()}


def tiny_model(seed=0, block_types=("attn", "jet")):
    from jetnas.models import JetNemotronForCausalLM
    from tests.utils import tiny_config

    torch.manual_seed(seed)
    return JetNemotronForCausalLM(tiny_config(list(block_types), vocab_size=64))


def pattern_stream(tmp_path, n=20000, period=7) -> TokenStream:
    data = (np.arange(n) % period + np.arange(n) // 1000 % 3).astype("<u2")
    path = tmp_path / "pattern.bin"
    data.tofile(path)
    return TokenStream.from_file(path)


def test_windows_are_deterministic_cover_the_stream_and_shard_exactly(tmp_path):
    stream = pattern_stream(tmp_path, n=1001)
    batcher = WindowBatcher(stream, seq_len=10, batch_size=4, seed=3)
    assert batcher.num_windows == 100
    seen = [w for step in range(25) for w in batcher.windows(step)]
    assert sorted(seen) == list(range(100))  # one epoch visits every window once
    assert seen != sorted(seen)  # in a shuffled order
    assert batcher.windows(5) == WindowBatcher(stream, 10, 4, seed=3).windows(5)
    assert batcher.windows(30) != batcher.windows(5)  # the next epoch is a different permutation
    full = batcher.batch(7)
    assert torch.equal(torch.cat([batcher.batch(7, r, 2) for r in range(2)]), full)
    assert torch.equal(full[0], stream.tokens(batcher.windows(7)[0] * 10, 11))


def test_training_lowers_the_loss(tmp_path):
    model = tiny_model()
    cfg = TrainConfig(steps=40, batch_size=8, seq_len=32, lr=3e-3, warmup_steps=4, out_dir=str(tmp_path / "run"))
    summary = Trainer(cfg, model, lm_loss, pattern_stream(tmp_path)).fit()
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 40 and np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    assert summary["steps"] == 40 and summary["tokens"] == 40 * 8 * 32
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["lr"] == 3e-3


def run_to(tmp_path, name, steps, total, micro=None, save_every=None):
    model = tiny_model()
    for n, p in model.named_parameters():  # train only the mixers, like PostNAS (frozen params must not be saved)
        p.requires_grad_(".self_attn." in n)
    cfg = TrainConfig(steps=total, batch_size=4, micro_batch_size=micro, seq_len=16, lr=1e-3, warmup_steps=2,
                      save_every=save_every, out_dir=str(tmp_path / name))
    trainer = Trainer(cfg, model, lm_loss, pattern_stream(tmp_path))
    if steps < total:  # simulate an interruption: stop after `steps`
        cfg.steps = steps
    trainer.fit()
    return model, trainer


def test_resume_continues_bit_identically(tmp_path):
    full_model, _ = run_to(tmp_path, "full", 8, 8)
    run_to(tmp_path, "split", 3, 8, save_every=1)  # interrupted after 3 steps
    resumed, trainer = run_to(tmp_path, "split", 8, 8)
    full_log = [json.loads(x) for x in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    split_log = [json.loads(x) for x in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    full_losses = {r["step"]: r["loss"] for r in full_log if "loss" in r}
    split_losses = {r["step"]: r["loss"] for r in split_log if "loss" in r}
    assert full_losses == split_losses  # exact equality: same data, same RNG, same optimizer state
    assert len([r for r in split_log if "loss" in r]) == 8  # each step logged once
    for (n, a), (_, b) in zip(full_model.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n


def test_a_resumed_run_counts_the_seconds_of_every_process(tmp_path):
    """`seconds` is the whole run's: the checkpoint carries the time before it, the resumed process adds its own
    (kept apart as `seconds_this_process`, with the step it resumed at)."""
    run_to(tmp_path, "timed", 3, 6, save_every=1)
    before = json.loads((latest_checkpoint(tmp_path / "timed") / "state.json").read_text())["train_seconds"]
    assert before > 0
    model = tiny_model()
    for n, p in model.named_parameters():
        p.requires_grad_(".self_attn." in n)
    cfg = TrainConfig(steps=6, batch_size=4, seq_len=16, lr=1e-3, warmup_steps=2, out_dir=str(tmp_path / "timed"))
    summary = Trainer(cfg, model, lm_loss, pattern_stream(tmp_path)).fit()
    assert summary["resumed_at_step"] == 3
    assert summary["seconds"] == pytest.approx(before + summary["seconds_this_process"], abs=0.02)
    # the last checkpoint (saved after the final evaluation) carries the whole run's time on to any later resume
    state = json.loads((latest_checkpoint(tmp_path / "timed") / "state.json").read_text())
    assert before < state["train_seconds"] <= summary["seconds"] + 0.01


def test_a_fresh_start_over_an_old_run_replaces_its_log(tmp_path):
    """A run directory copied without its checkpoints (as a GPU session carries on) trains from step 0 again: the
    log must then describe the new run only, the old rows kept aside, not appended to."""
    import shutil

    run_to(tmp_path, "again", 3, 3, save_every=1)
    shutil.rmtree(tmp_path / "again" / "checkpoints")
    run_to(tmp_path, "again", 3, 3)
    steps = [json.loads(x)["step"] for x in (tmp_path / "again" / "log.jsonl").read_text().splitlines()
             if "loss" in x]
    assert steps == [1, 2, 3]
    old = (tmp_path / "again" / "log.replaced.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in old if "loss" in x] == [1, 2, 3]


def test_checkpoints_are_safetensors_atomic_and_trainable_only(tmp_path):
    from safetensors.torch import load_file

    model, _ = run_to(tmp_path, "ck", 4, 4, save_every=1)
    ckpt = latest_checkpoint(tmp_path / "ck")
    assert ckpt.name == "step-00000004"
    assert len(list((tmp_path / "ck" / "checkpoints").glob("step-*"))) == 2  # keep_checkpoints
    weights = load_file(str(ckpt / "model.safetensors"))
    assert weights and all(".self_attn." in k for k in weights)
    assert {f.name for f in ckpt.iterdir()} == {"model.safetensors", "optimizer.safetensors", "rng.safetensors",
                                                "state.json", "manifest.json"}
    # a half-written newer checkpoint is ignored
    (tmp_path / "ck" / "checkpoints" / "step-00000009.partial").mkdir()
    (tmp_path / "ck" / "checkpoints" / "step-00000010").mkdir()  # no state.json: incomplete
    assert latest_checkpoint(tmp_path / "ck") == ckpt


def test_micro_batches_accumulate_to_the_full_batch(tmp_path):
    full, _ = run_to(tmp_path, "mb-full", 3, 3)
    accum, trainer = run_to(tmp_path, "mb-accum", 3, 3, micro=1)
    assert trainer.accumulation == 4
    for (n, a), (_, b) in zip(full.named_parameters(), accum.named_parameters()):
        if n.endswith("k_proj.bias"):
            # softmax ignores a bias shared by all keys: its gradient is rounding noise, which Adam scales up to
            # lr-sized steps in arbitrary directions
            continue
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), n


def test_text_files_and_teacher_text_are_cached(tmp_path, monkeypatch):
    from tests.utils import tiny_tokenizer

    monkeypatch.setenv("JETNAS_CACHE", str(tmp_path / "cache"))
    tok = tiny_tokenizer()
    doc = tmp_path / "docs.jsonl"
    doc.write_text("".join(json.dumps({"text": f"The quick brown fox number {i}."}) + "\n" for i in range(50)))
    stream, heldout = resolve_data(str(doc), tok, teacher_eos=0, heldout_tokens=20)
    assert len(heldout) == 20 and len(stream) > 200
    cached = list((tmp_path / "cache" / "data").glob("text-*.bin"))
    assert len(cached) == 1
    again, _ = resolve_data(str(doc), tok, teacher_eos=0, heldout_tokens=20)
    assert list((tmp_path / "cache" / "data").glob("text-*.bin")) == cached and len(again) == len(stream)
    model = tiny_model(block_types=("attn",)).eval()
    model.resize_token_embeddings(len(tok)) if model.config.vocab_size < len(tok) else None
    gen = teacher_generated(model, tok, eos_id=0, tokens=300, seed=1, batch_size=4, length=16, name="tiny")
    assert len(gen) == 300 and int(np.asarray(gen.array).max()) < len(tok)
    mtime = next((tmp_path / "cache" / "data").glob("generated-*.bin")).stat().st_mtime_ns
    teacher_generated(model, tok, eos_id=0, tokens=300, seed=1, batch_size=4, length=16, name="tiny")
    assert next((tmp_path / "cache" / "data").glob("generated-*.bin")).stat().st_mtime_ns == mtime


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"TrainConfig.lr=-1.0 is out of range"):
        TrainConfig(steps=1, lr=-1.0)
    with pytest.raises(ValueError, match=r"TrainConfig.precision='fp8'"):
        TrainConfig(steps=1, precision="fp8")


@pytest.mark.slow(seconds=18)
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_two_processes_match_one(tmp_path, mode):
    script = ROOT / "tests" / "train" / "distributed_script.py"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, str(script), str(tmp_path / "one"), mode], env=env,
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                            "--master-port", str(29500 + (os.getpid() % 1000)), str(script), str(tmp_path / "two"),
                            mode], env=env, capture_output=True, text=True, timeout=600)
    assert multi.returncode == 0, multi.stderr[-3000:]
    one = [json.loads(x)["loss"] for x in (tmp_path / "one" / "log.jsonl").read_text().splitlines() if "loss" in x]
    two = [json.loads(x)["loss"] for x in (tmp_path / "two" / "log.jsonl").read_text().splitlines() if "loss" in x]
    print(f"{mode}: 1 process {one}\n{mode}: 2 processes {two}")
    assert len(one) == len(two) == 6
    # same global batch, same data, same updates; only float32 reduction order differs
    assert np.allclose(one, two, rtol=1e-5, atol=1e-6)
