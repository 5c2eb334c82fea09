"""Checkpoints and run folders that survive bad bytes (issue 17): each damage the issue lists (flipped, truncated,
deleted, garbled files; non-finite losses, gradients and weights; changed arguments; a second writer; a cut log)
is caught with a message naming it, the run continues from the newest good state and ends equal to an uninterrupted
run, and every good checkpoint saved before is still there and loads."""

import json
import os
import re
import socket
import subprocess

import numpy as np
import pytest
import torch

from jetnas.train import checkpoint as ckpt_mod
from jetnas.train.checkpoint import (
    CheckpointError,
    NonFiniteError,
    RunIdentityError,
    RunLockedError,
    all_finite,
    check_finite,
    checkpoint_problem,
    load_checkpoint,
)
from jetnas.train.data import TokenStream
from jetnas.train.trainer import TrainConfig, Trainer
from jetnas.validation import InputError
from tests.train.test_trainer import lm_loss, pattern_stream, tiny_model

STEPS = 6


def make_trainer(tmp_path, name, steps=STEPS, stop_after=None, save_every=2, keep=10, loss=lm_loss, data=None,
                 identity=None, **overrides):
    """A tiny model whose token mixers train (as in PostNAS), and its trainer; `stop_after`: interrupted (Ctrl-C)
    after that many steps, which saves them."""
    if stop_after is not None:
        inner = loss

        def loss(model, batch, step):
            if step == stop_after:
                raise KeyboardInterrupt
            return inner(model, batch, step)

    # two attention layers: the plumbing under test is the same for any block, and these steps are the cheapest
    model = tiny_model(block_types=("attn", "attn"))
    for n, p in model.named_parameters():
        p.requires_grad_(".self_attn." in n)
    fields = dict(steps=steps, batch_size=4, seq_len=16, lr=1e-3, warmup_steps=2, save_every=save_every,
                  keep_checkpoints=keep, out_dir=str(tmp_path / name))
    fields.update(overrides)
    cfg = TrainConfig(**fields)
    trainer = Trainer(cfg, model, loss, data if data is not None else pattern_stream(tmp_path), identity=identity)
    return model, trainer


def run(tmp_path, name, **kwargs):
    model, trainer = make_trainer(tmp_path, name, **kwargs)
    try:
        summary = trainer.fit()
    except KeyboardInterrupt:
        assert kwargs.get("stop_after") is not None
        summary = None
    return model, trainer, summary


def losses(out_dir) -> dict[int, float]:
    rows = [json.loads(x) for x in (out_dir / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: its losses and trained weights."""
    root = tmp_path_factory.mktemp("reference")
    model, _, _ = run(root, "ref")
    return losses(root / "ref"), {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_equals_reference(model, out_dir, reference):
    ref_losses, ref_weights = reference
    assert losses(out_dir) == ref_losses  # exact: same data, same RNG, same optimizer state
    for n, p in model.named_parameters():
        assert torch.equal(p, ref_weights[n]), n


def test_sigterm_stops_after_the_step_saves_it_and_the_run_resumes_exactly(tmp_path, reference):
    # a scheduler's preemption or `timeout` sends SIGTERM: the step in progress finishes and is saved (step 3, not
    # a save_every multiple), the run raises TrainingStopped (a KeyboardInterrupt) and the previous handler is back;
    # the same command resumes and ends equal to an uninterrupted run
    import signal

    from jetnas.train.trainer import TrainingStopped

    def terminated_at_2(model, batch, step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return lm_loss(model, batch, step)

    before = signal.getsignal(signal.SIGTERM)
    _, trainer = make_trainer(tmp_path, "run", loss=terminated_at_2)
    with pytest.raises(TrainingStopped, match="after step 3 of 6"):
        trainer.fit()
    assert signal.getsignal(signal.SIGTERM) is before
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()
                  if p.name.startswith("step-")) == ["step-00000002", "step-00000003"]
    model, _, _ = run(tmp_path, "run")
    assert_equals_reference(model, tmp_path / "run", reference)


def test_a_sigterm_in_the_last_step_is_passed_on_once_the_run_is_saved(tmp_path):
    # nothing is left to stop for: the run finishes, saves, and the signal then reaches the handler installed before
    # (here a recording one; by default it would end the process, with everything saved)
    import signal

    seen = []

    def terminated_last(model, batch, step):
        if step == STEPS - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return lm_loss(model, batch, step)

    before = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        _, trainer = make_trainer(tmp_path, "run", loss=terminated_last)
        summary = trainer.fit()
    finally:
        signal.signal(signal.SIGTERM, before)
    assert summary["steps"] == STEPS and seen == [signal.SIGTERM]
    assert (tmp_path / "run" / "checkpoints" / f"step-{STEPS:08d}").is_dir()


def assert_loads(path):
    """A checkpoint verifies and loads into a fresh model and optimizer, with finite weights."""
    assert checkpoint_problem(path) is None, path
    model, trainer = make_trainer(path.parents[2], "unused", data=TokenStream((np.arange(2000) % 7).astype("<u2")))
    meta = load_checkpoint(path, trainer.model, trainer.optimizer)
    assert meta["step"] == int(path.name.split("-")[1])
    check_finite(dict(model.named_parameters()), str(path))


def ckpt(tmp_path, name, step):
    return tmp_path / name / "checkpoints" / f"step-{step:08d}"


def flip(path, n=64):
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + n] = bytes(b ^ 0xFF for b in data[mid : mid + n])
    path.write_bytes(bytes(data))


def garble(path):
    """Same size, some bytes replaced: JSON that no longer parses."""
    text = path.read_text()
    mid = len(text) // 2
    path.write_text(text[:mid] + "#" * 8 + text[mid + 8 :])


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGE = {
    "flip-optimizer": (lambda c: flip(c / "optimizer.safetensors"),
                       r"optimizer.safetensors does not match its sha256 \(bytes changed\)"),
    "flip-model": (lambda c: flip(c / "model.safetensors"), "model.safetensors does not match its sha256"),
    "truncate-optimizer": (lambda c: truncate(c / "optimizer.safetensors"),
                           r"optimizer.safetensors is truncated \(\d+ of \d+ bytes\)"),
    "delete-rng": (lambda c: (c / "rng.safetensors").unlink(), "rng.safetensors is missing"),
    "garble-state": (lambda c: garble(c / "state.json"), "state.json does not match its sha256"),
    "longer-state": (lambda c: (c / "state.json").write_text((c / "state.json").read_text() + " "),
                     r"state.json has \d+ bytes, its manifest says \d+"),
    "delete-manifest": (lambda c: (c / "manifest.json").unlink(), "manifest.json is missing"),
    "garble-manifest": (lambda c: (c / "manifest.json").write_text("{"), "manifest.json is damaged"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_is_skipped_and_the_run_ends_as_an_uninterrupted_one(tmp_path, capsys,
                                                                                         reference, damage):
    run(tmp_path, "r", stop_after=4)  # killed after step 4: checkpoints 2 and 4
    hurt, message = DAMAGE[damage]
    hurt(ckpt(tmp_path, "r", 4))
    capsys.readouterr()
    model, _, _ = run(tmp_path, "r")
    err = capsys.readouterr().err
    assert "skipping damaged checkpoint step-00000004: " in err
    assert re.search(message, err), err
    assert "resuming from" in err and "step-00000002 (step 2)" in err
    assert_equals_reference(model, tmp_path / "r", reference)
    # the damaged one is kept aside for inspection; every good checkpoint is there and loads
    assert (tmp_path / "r" / "checkpoints" / "damaged" / "step-00000004").is_dir()
    for step in (2, 4, 6):
        assert_loads(ckpt(tmp_path, "r", step))


def test_with_every_checkpoint_damaged_the_run_starts_over_and_still_matches(tmp_path, capsys, reference):
    run(tmp_path, "r", stop_after=4)
    flip(ckpt(tmp_path, "r", 4) / "model.safetensors")
    truncate(ckpt(tmp_path, "r", 2) / "optimizer.safetensors")
    capsys.readouterr()
    model, _, _ = run(tmp_path, "r")
    err = capsys.readouterr().err
    assert "skipping damaged checkpoint step-00000004" in err and "skipping damaged checkpoint step-00000002" in err
    assert "no intact checkpoint is left: starting from step 0" in err
    assert_equals_reference(model, tmp_path / "r", reference)


def test_load_checkpoint_verifies_and_names_the_damage(tmp_path):
    _, trainer, _ = run(tmp_path, "r", steps=2)
    path = ckpt(tmp_path, "r", 2)
    truncate(path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"checkpoint .*step-00000002 cannot be used: model.safetensors is "
                                              r"truncated"):
        load_checkpoint(path, trainer.model, trainer.optimizer)


def test_a_checkpoint_written_before_manifests_still_loads_and_a_garbled_one_is_named(tmp_path, capsys, reference):
    run(tmp_path, "r", stop_after=4)
    for step in (2, 4):  # as an older jetnas wrote them: no manifest, no format field
        path = ckpt(tmp_path, "r", step)
        (path / "manifest.json").unlink()
        meta = json.loads((path / "state.json").read_text())
        del meta["format"]
        (path / "state.json").write_text(json.dumps(meta))
    (ckpt(tmp_path, "r", 4) / "state.json").write_text('{"step": 4, "param_gr')
    capsys.readouterr()
    model, _, _ = run(tmp_path, "r")
    err = capsys.readouterr().err
    assert "step-00000004/state.json: not valid JSON" in err
    assert "resuming from" in err and "(step 2)" in err
    assert_equals_reference(model, tmp_path / "r", reference)


def test_rotation_deletes_a_checkpoint_only_while_a_newer_one_verifies(tmp_path, monkeypatch):
    deleted = []
    remove = ckpt_mod._remove

    def checked_remove(path):
        newer = [p for p in ckpt_mod.checkpoint_dirs(path.parents[1]) if p.name > path.name]
        assert any(checkpoint_problem(p) is None for p in newer), f"deleting {path} with no verified newer one"
        deleted.append(path.name)
        remove(path)

    monkeypatch.setattr(ckpt_mod, "_remove", checked_remove)
    run(tmp_path, "r", stop_after=4, save_every=1, keep=1)
    assert [p.name for p in ckpt_mod.checkpoint_dirs(tmp_path / "r")] == ["step-00000004"]
    flip(ckpt(tmp_path, "r", 4) / "optimizer.safetensors")
    run(tmp_path, "r", save_every=1, keep=1)  # the damaged step 4 is moved aside, not counted: nothing to resume
    assert [p.name for p in ckpt_mod.checkpoint_dirs(tmp_path / "r")] == ["step-00000006"]
    assert deleted == ["step-00000001", "step-00000002", "step-00000003", "step-00000001", "step-00000002",
                       "step-00000003", "step-00000004", "step-00000005"]


# ---------------------------------------------------------------------------------------------------------------
# non-finite values


def nan_at(step_index, where="loss"):
    """`lm_loss`, but at 0-based step `step_index` a NaN loss, or (where="grad") a finite loss with infinite
    gradients."""

    class InfGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * float("inf")

    def loss_fn(model, batch, step):
        loss, metrics = lm_loss(model, batch, step)
        if step == step_index:
            loss = loss * float("nan") if where == "loss" else InfGrad.apply(loss)
        return loss, metrics

    return loss_fn


@pytest.mark.parametrize("where, message", [("loss", r"step 5: the loss is nan"),
                                            ("grad", r"step 5: the loss is [\d.]+ and the gradient norm (inf|nan)")])
def test_a_nonfinite_loss_or_gradient_stops_the_run_before_anything_is_saved(tmp_path, where, message):
    model, trainer = make_trainer(tmp_path, "r", loss=nan_at(4, where))
    with pytest.raises(NonFiniteError, match=message + r".*stopped before its optimizer step"):
        trainer.fit()
    assert isinstance(NonFiniteError("x"), ValueError)  # the CLI prints it as one line, exit 2
    assert [p.name for p in ckpt_mod.checkpoint_dirs(tmp_path / "r")] == ["step-00000004", "step-00000002"]
    for step in (2, 4):
        assert_loads(ckpt(tmp_path, "r", step))
    # the weights in memory are step 4's: the bad step changed nothing
    saved = ckpt_mod.load_file(str(ckpt(tmp_path, "r", 4) / "model.safetensors"))
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in saved.items())
    assert max(losses(tmp_path / "r")) == 4
    assert not (tmp_path / "r" / "run.lock").exists()  # released on the way out


def test_skip_mode_drops_the_bad_update_and_goes_on(tmp_path, reference):
    model, _, summary = run(tmp_path, "r", loss=nan_at(4), on_nonfinite="skip")
    rows = {r["step"]: r for r in map(json.loads, (tmp_path / "r" / "log.jsonl").read_text().splitlines())}
    assert summary["skipped_steps"] == 1 and rows[5]["skipped"] is True and "skipped" not in rows[4]
    assert [rows[s]["loss"] for s in (1, 2, 3, 4)] == [reference[0][s] for s in (1, 2, 3, 4)]
    check_finite(dict(model.named_parameters()), "model")


def test_nonfinite_weights_are_never_written(tmp_path):
    model, trainer, _ = run(tmp_path, "r", steps=2)
    before = sorted(os.listdir(tmp_path / "r" / "checkpoints"))
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight[0, 0] = float("inf")
    trainer.step = 3
    with pytest.raises(NonFiniteError, match=r"step 3: non-finite weights in model.layers.1.self_attn.q_proj.weight"):
        trainer._save()
    assert sorted(os.listdir(tmp_path / "r" / "checkpoints")) == before
    with pytest.raises(NonFiniteError, match=r"final model: non-finite values in w \(1 of 4\); not written"):
        check_finite({"w": torch.tensor([1.0, float("nan"), 2.0, 3.0]), "ids": torch.tensor([1, 2])}, "final model")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_all_finite_agrees_with_isfinite_also_where_the_sum_overflows(dtype):
    big = torch.finfo(dtype).max
    cases = {"finite": [1.0, -2.0, 3.0], "empty": [], "overflowing sum": [big, big, big],
             "nan": [1.0, float("nan")], "inf": [float("inf"), 1.0], "-inf": [-big, float("-inf")],
             "inf - inf": [float("inf"), float("-inf")]}
    for name, values in cases.items():
        t = torch.tensor(values, dtype=dtype)
        assert all_finite(t) == bool(torch.isfinite(t).all()), name
    with pytest.raises(NonFiniteError, match=r"w \(1 of 3\)"):
        check_finite({"w": torch.tensor([big, big, float("inf")], dtype=dtype)}, "m")


# ---------------------------------------------------------------------------------------------------------------
# the run folder: identity, --no-resume, the lock, the log


def test_resuming_with_other_arguments_is_refused_naming_each(tmp_path):
    run(tmp_path, "r", stop_after=4, identity={"layer_types": "attn,jet"})
    files = sorted(p.name for p in (tmp_path / "r").iterdir())
    log = (tmp_path / "r" / "log.jsonl").read_text()
    with pytest.raises(RunIdentityError, match=r"holds a run with other arguments.*batch_size 4 -> 8; "
                                               r"layer_types 'attn,jet' -> 'attn,gdn'; lr 0.001 -> 0.002\. "
                                               r"Resume it with its own arguments, or start over with --no-resume"):
        run(tmp_path, "r", lr=2e-3, batch_size=8, identity={"layer_types": "attn,gdn"})
    with pytest.raises(RunIdentityError, match=r"seq_len 16 -> 32"):
        run(tmp_path, "r", seq_len=32, identity={"layer_types": "attn,jet"})
    other = TokenStream((np.arange(20000) % 5).astype("<u2"), name="other")
    with pytest.raises(RunIdentityError, match=r"data \[\{'digest'"):
        run(tmp_path, "r", data=other, identity={"layer_types": "attn,jet"})
    # nothing changed: the files, the log, every checkpoint
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == files
    assert (tmp_path / "r" / "log.jsonl").read_text() == log
    for step in (2, 4):
        assert_loads(ckpt(tmp_path, "r", step))
    # the same arguments resume
    run(tmp_path, "r", identity={"layer_types": "attn,jet"})
    assert max(losses(tmp_path / "r")) == STEPS


def test_no_resume_moves_the_old_run_aside_and_starts_clean(tmp_path, capsys):
    """Issue 17, item 3: the old run's checkpoints must not count in the new run's rotation, and a later plain resume
    continues the new run."""
    run(tmp_path, "r", steps=8, save_every=1, keep=2)  # old run: checkpoints 7 and 8
    capsys.readouterr()
    run(tmp_path, "r", steps=3, save_every=1, keep=2, seed=1, lr=2e-3, resume=False)
    err = capsys.readouterr().err
    assert "starting over (resume off); the old run is moved to" in err
    old = next((tmp_path / "r" / "old-runs").iterdir())
    assert sorted(p.name for p in (old / "checkpoints").iterdir()) == ["step-00000007", "step-00000008"]
    for step in (7, 8):
        assert_loads(old / "checkpoints" / f"step-{step:08d}")
    assert max(losses(old)) == 8
    assert [p.name for p in ckpt_mod.checkpoint_dirs(tmp_path / "r")] == ["step-00000003", "step-00000002"]
    assert sorted(losses(tmp_path / "r")) == [1, 2, 3]
    model, trainer, summary = run(tmp_path, "r", steps=3, save_every=1, keep=2, seed=1, lr=2e-3)
    assert summary["steps"] == 3 and sorted(losses(tmp_path / "r")) == [1, 2, 3]


def test_an_earlier_run_that_left_no_checkpoint_is_moved_aside(tmp_path, capsys):
    run(tmp_path, "r", steps=2, save_every=None)
    for p in ckpt_mod.checkpoint_dirs(tmp_path / "r"):
        ckpt_mod._remove(p)
    capsys.readouterr()
    run(tmp_path, "r", steps=2, save_every=None, lr=2e-3)
    err = capsys.readouterr().err
    assert "an earlier run with other arguments (lr 0.001 -> 0.002) left no checkpoint" in err
    assert (next((tmp_path / "r" / "old-runs").iterdir()) / "log.jsonl").exists()


def lock_record(pid, host=None):
    return json.dumps({"pid": pid, "host": host or socket.gethostname(), "start": ckpt_mod._process_start(pid),
                       "since": "2026-01-01 00:00:00"})


def test_a_second_writer_is_refused_and_a_dead_writers_lock_is_taken_over(tmp_path, capsys):
    run(tmp_path, "r", stop_after=2)
    lock = tmp_path / "r" / "run.lock"
    files = sorted(p.name for p in (tmp_path / "r").iterdir())
    live = subprocess.Popen(["sleep", "60"])
    try:
        lock.write_text(lock_record(live.pid))
        with pytest.raises(RunLockedError, match=rf"being written by another jetnas process \(pid {live.pid} on "
                                                 r"this host, since 2026-01-01 00:00:00\)"):
            run(tmp_path, "r")
        assert sorted(p.name for p in (tmp_path / "r").iterdir()) == sorted(files + ["run.lock"])
        assert_loads(ckpt(tmp_path, "r", 2))
    finally:
        live.kill()
        live.wait()
    lock.write_text(lock_record(live.pid))  # that process is gone now
    capsys.readouterr()
    run(tmp_path, "r")
    assert f"taking over the lock of pid {live.pid} (since 2026-01-01 00:00:00), no longer running" in \
        capsys.readouterr().err
    assert not lock.exists() and max(losses(tmp_path / "r")) == STEPS
    lock.write_text(lock_record(12345, host="elsewhere"))
    with pytest.raises(RunLockedError, match=r"locked by pid 12345 on host 'elsewhere'.*cannot be checked from "
                                             r"here: if that process is gone, delete"):
        run(tmp_path, "r")


def test_a_cut_last_log_line_is_dropped_and_a_garbled_middle_line_named(tmp_path, capsys, reference):
    run(tmp_path, "r", stop_after=4)
    log = tmp_path / "r" / "log.jsonl"
    log.write_text(log.read_text() + '{"step": 5, "loss": 4.0')  # killed while writing step 5's row
    capsys.readouterr()
    model, _, _ = run(tmp_path, "r")
    assert "dropping its cut last line 5" in capsys.readouterr().err
    assert_equals_reference(model, tmp_path / "r", reference)
    lines = log.read_text().splitlines()
    log.write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    with pytest.raises(InputError, match=r"log.jsonl line 2: not a JSON object"):
        run(tmp_path, "r", steps=STEPS)


def test_a_garbled_run_json_is_named(tmp_path):
    run(tmp_path, "r", stop_after=2)
    (tmp_path / "r" / "run.json").write_text('{"identity": {"lr": 0.0')
    with pytest.raises(InputError, match=r"run.json: not valid JSON"):
        run(tmp_path, "r")
    assert not (tmp_path / "r" / "run.lock").exists()


def test_token_ids_beyond_the_vocabulary_are_refused_before_anything_is_written(tmp_path):
    data = (np.arange(20000) % 7).astype("<u2")
    data[12345] = 70  # the tiny model embeds 64 ids
    path = tmp_path / "bad.bin"
    data.tofile(path)
    with pytest.raises(InputError, match=r"training data bad.bin: token id 70 at position 12345 is outside the "
                                         r"model's vocabulary of 64"):
        run(tmp_path, "r", data=TokenStream.from_file(path))
    assert not (tmp_path / "r").exists()


def test_prepare_takes_the_folder_before_the_caller_writes_into_it(tmp_path):
    """A caller (a training stage) writes its own records into out_dir only after `prepare`: a refused run leaves
    the old run's records as they were."""
    run(tmp_path, "r", stop_after=2)
    (tmp_path / "r" / "stage_config.json").write_text('{"lr": 0.001}')
    _, trainer = make_trainer(tmp_path, "r", lr=2e-3)
    with pytest.raises(RunIdentityError, match=r"lr 0.001 -> 0.002"):
        trainer.prepare()
    assert (tmp_path / "r" / "stage_config.json").read_text() == '{"lr": 0.001}'
    _, trainer = make_trainer(tmp_path, "r")
    trainer.prepare()
    assert (tmp_path / "r" / "run.lock").exists()
    assert trainer.fit()["steps"] == STEPS and not (tmp_path / "r" / "run.lock").exists()
