"""Layer-wise alignment on a tiny Llama teacher: the captured inputs and outputs are exactly what the teacher's mixers
compute inside its own forward (left padding included), only the aligned blocks train, a few steps lower the
alignment loss, training resumes exactly, and an aligned hybrid starts stage 1 with a lower distillation loss."""

import copy
import json

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from jetnas.train.align import (
    LayerAligner,
    alignment_layers,
    capture_teacher_io,
    make_align_loss,
    relative_mse,
    set_align_trainable,
    train_alignment,
)
from jetnas.train.data import TokenStream
from jetnas.train.stages import StageConfig, build_student, load_stage_teacher, stage_losses
from jetnas.train.trainer import TrainConfig, Trainer
from tests.utils import _CORPUS, tiny_tokenizer

TYPES = "attn,gdn,swa,jet"


def make_teacher(path, seed: int = 0):
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return load_stage_teacher(str(path))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(teacher, a stage-1 config converting it to attn/gdn/swa/jet, the corpus as train and held-out tokens)."""
    root = tmp_path_factory.mktemp("align")
    teacher = make_teacher(root / "teacher")
    config = StageConfig(stage=1, teacher=str(root / "teacher"), layer_types=TYPES, swa_window=6, steps=1,
                         out_dir=str(root / "unused"))
    ids = np.array(tiny_tokenizer()(_CORPUS * 40)["input_ids"], dtype="<u2")
    train, heldout = TokenStream(ids).split(33 * 8)
    return teacher, config, train, heldout


def student_of(setup, seed: int = 0):
    teacher, config, _, _ = setup
    config = copy.copy(config)
    config.seed = seed
    return build_student(config, teacher)[0]


def test_default_layers_are_the_linear_ones_and_attn_is_refused(setup):
    student = student_of(setup)
    assert alignment_layers(student) == [1, 3]
    assert alignment_layers(student, [2, 1]) == [1, 2]  # an swa layer may be aligned when asked for
    with pytest.raises(ValueError, match=r"layers \[0\] are full attention"):
        alignment_layers(student, [0, 1])
    with pytest.raises(ValueError, match=r"outside the model's 4 layers"):
        alignment_layers(student, [4])


@pytest.mark.parametrize("padded", [False, True], ids=["no-padding", "left-padding"])
def test_captured_io_is_the_teachers_own_computation(setup, padded):
    teacher = copy.deepcopy(setup[0].model).double()
    base = teacher.model
    ids = torch.randint(0, teacher.config.vocab_size, (3, 19))
    mask = None
    if padded:
        mask = torch.ones_like(ids)
        mask[0, :5] = 0
        mask[2, :2] = 0
    layers = [1, 2, 3]
    io = capture_teacher_io(teacher, ids, layers, mask)
    # the reference: the full forward's hidden states (the input of each layer), then that layer's norm and mixer
    # called by hand with the positions the model derives from the mask
    with torch.no_grad():
        hidden = teacher(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True).hidden_states
        pos = (torch.arange(19).expand(3, 19) if mask is None else (mask.cumsum(-1) - 1).clamp(min=0))
        rope = base.rotary_emb(hidden[0], pos)
        for k, i in enumerate(layers):
            layer = base.layers[i]
            x = layer.input_layernorm(hidden[i])
            y, _ = layer.self_attn(x, None, attention_mask=mask, position_ids=pos, position_embeddings=rope)
            assert io.inputs[k].dtype == torch.float64
            # same float64 operations in the same order: bit-identical, not merely close
            assert torch.equal(io.inputs[k], x), i
            assert torch.equal(io.outputs[k], y), i
    assert torch.equal(io.position_ids, pos)
    assert (io.attention_mask is None) == (mask is None)


def test_capture_stops_after_the_last_aligned_layer(setup):
    teacher = setup[0].model
    calls = []
    handles = [teacher.model.layers[i].register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i in range(4)]
    try:
        capture_teacher_io(teacher, torch.randint(0, 50, (1, 7)), [1])
    finally:
        for h in handles:
            h.remove()
    # layer 1's mixer ended the forward: its MLP and the later layers never ran
    assert calls == [0]


def test_only_the_aligned_blocks_train(setup):
    student = student_of(setup)
    counts = set_align_trainable(student, [1, 3])
    trained = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith(("model.layers.1.self_attn.", "model.layers.3.self_attn.")) for n in trained)
    assert counts["trainable_parameters"] == sum(p.numel() for n, p in student.named_parameters() if n in trained)
    aligner = LayerAligner(student, [1, 3])
    # the aligner holds the hybrid's own blocks (no copy), and nothing else
    assert aligner.blocks["1"] is student.model.layers[1].self_attn
    assert {id(p) for p in aligner.parameters()} == {id(p) for n, p in student.named_parameters() if n in trained}


def test_relative_mse_is_per_sequence_and_ignores_padding():
    torch.manual_seed(0)
    s, t = torch.randn(4, 6, 8), torch.randn(4, 6, 8)
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[1, :3] = 0
    got = relative_mse(s, t, mask)
    expected = torch.stack([((s[b] - t[b])[mask[b] == 1].pow(2).mean() / t[b][mask[b] == 1].pow(2).mean())
                            for b in range(4)])
    assert torch.allclose(got, expected, rtol=1e-6)
    assert torch.allclose(relative_mse(s, t), relative_mse(s, t, torch.ones(4, 6)), rtol=1e-6)
    # a padded position's values do not matter
    s2 = s.clone()
    s2[1, 0] += 100
    assert torch.equal(relative_mse(s2, t, mask), got)
    with pytest.raises(ValueError, match=r"must both be \[B, T, D\]"):
        relative_mse(s, t[:, :5])


def test_alignment_loss_ignores_what_sits_under_left_padding(setup):
    teacher = setup[0].model
    student = student_of(setup)
    aligner = LayerAligner(student, alignment_layers(student))
    loss_fn = make_align_loss(teacher)
    ids = torch.randint(0, teacher.config.vocab_size, (2, 17))
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    other = ids.clone()
    other[0, :6] = (other[0, :6] + 7) % teacher.config.vocab_size
    with torch.no_grad():
        a, _ = loss_fn(aligner, {"input_ids": ids, "attention_mask": mask}, 0)
        b, _ = loss_fn(aligner, {"input_ids": other, "attention_mask": mask}, 0)
        c, _ = loss_fn(aligner, {"input_ids": other}, 0)
    # padded tokens are never attended to, leave linear states untouched and are left out of the loss
    assert torch.allclose(a, b, rtol=1e-6, atol=0)
    assert not torch.allclose(a, c)


def read_log(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def test_a_few_steps_lower_the_alignment_loss_of_every_layer(setup, tmp_path):
    teacher, _, train, heldout = setup
    student = student_of(setup)
    frozen = {n: p.detach().clone() for n, p in student.named_parameters() if ".self_attn." not in n}
    summary = train_alignment(student, teacher.model, train,
                              TrainConfig(steps=20, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2,
                                          eval_every=10, out_dir=str(tmp_path)), heldout=heldout)
    log = read_log(tmp_path)
    rows = [r for r in log if "loss" in r]
    assert len(rows) == 20 and {"align", "align/1", "align/3"} <= set(rows[0])
    assert np.mean([r["loss"] for r in rows[-4:]]) < 0.7 * np.mean([r["loss"] for r in rows[:4]])
    evals = [r for r in log if "eval/align" in r]
    assert len(evals) == 2 and set(summary["eval"]) == {"align", "align/1", "align/3"}
    for layer in ("1", "3"):
        assert evals[-1][f"eval/align/{layer}"] < rows[0][f"align/{layer}"]
    # the hybrid was trained in place: its aligned blocks moved, the rest did not
    for name, value in frozen.items():
        assert torch.equal(dict(student.named_parameters())[name], value), name


def test_a_held_out_tail_of_whole_windows_is_scored_as_the_windows_it_holds(setup, tmp_path):
    """A tail of 4 x seq_len tokens holds 3 windows of seq_len + 1 (inputs and labels): the alignment's held-out loss
    scores those 3 (it asked for 4 and stopped the run, as stage 1 at 4,096-token sequences with 16,384 held-out
    tokens did), as the stages' held-out evaluation does."""
    teacher, _, train, _ = setup
    _, tail = train.split(4 * 32)
    summary = train_alignment(student_of(setup), teacher.model, train,
                              TrainConfig(steps=2, batch_size=2, seq_len=32, lr=1e-3, eval_every=2,
                                          out_dir=str(tmp_path)), heldout=tail)
    assert len(tail) == 128 and np.isfinite(summary["eval"]["align"])


def test_alignment_resumes_exactly(setup, tmp_path):
    teacher, _, train, _ = setup

    def run(name, steps):
        student = student_of(setup)
        cfg = TrainConfig(steps=6, batch_size=4, seq_len=16, lr=3e-3, warmup_steps=2, save_every=1,
                          out_dir=str(tmp_path / name))
        layers = alignment_layers(student)
        set_align_trainable(student, layers)
        trainer = Trainer(cfg, LayerAligner(student, layers), make_align_loss(teacher.model), train)
        # an interruption after `steps` (see test_stages: the learning rates before it are the full run's)
        cfg.steps = steps
        trainer.fit()
        return student

    full = run("full", 6)
    run("split", 3)
    resumed = run("split", 6)
    assert [r["loss"] for r in read_log(tmp_path / "full")] == [r["loss"] for r in read_log(tmp_path / "split")]
    for (n, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n


def test_an_aligned_hybrid_starts_stage_1_with_a_lower_distillation_loss(setup, tmp_path):
    """Checked by hand with teacher and student seeds 0-4 (the same seed for both) and three layouts (attn,gdn,swa,jet
    as here, attn,gdn,gdn,gdn, attn,jet,gla,gdn): 30 alignment steps cut the held-out stage-1 loss (hidden + KL)
    2.3-3.9x every time (e.g. 0.158 -> 0.058); the test asks for a third less, far from what any seed gave."""
    teacher, config, train, heldout = setup
    aligned = student_of(setup, seed=1)
    unaligned = copy.deepcopy(aligned)
    train_alignment(aligned, teacher.model, train,
                    TrainConfig(steps=30, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2, out_dir=str(tmp_path)))
    batch = heldout.window_batch(8, 32)
    with torch.no_grad():
        before, terms_before = stage_losses(config, unaligned.eval(), teacher.model, batch)
        after, terms_after = stage_losses(config, aligned.eval(), teacher.model, batch)
    assert after < 0.67 * before
    assert terms_after["hidden"] < terms_before["hidden"] and terms_after["kl"] < terms_before["kl"]


def _align_under(teacher_dir: str, out: str, mode: str) -> None:
    """Four alignment steps on the tiny teacher, in this process or as one rank of torchrun (see the test below)."""
    from jetnas.train.distributed import teardown

    teacher = load_stage_teacher(teacher_dir)
    config = StageConfig(stage=1, teacher=teacher_dir, layer_types=TYPES, swa_window=6, steps=1, out_dir=out)
    student = build_student(config, teacher)[0]
    ids = np.array(tiny_tokenizer()(_CORPUS * 40)["input_ids"], dtype="<u2")
    train_alignment(student, teacher.model, TokenStream(ids),
                    TrainConfig(steps=4, batch_size=4, seq_len=16, lr=3e-3, warmup_steps=1, out_dir=out,
                                distributed=mode))
    teardown()


@pytest.mark.slow(seconds=16)
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_two_processes_align_like_one(tmp_path, mode):
    """The aligner is what the trainer wraps, so DDP averages its gradients and FSDP gathers its blocks: two
    processes with half the batch each take the single process's steps (a hybrid called around the wrapper would
    train each rank on its own half and the logged mean loss would part from the single process's)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    make_teacher(tmp_path / "teacher")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    script = Path(__file__).resolve()
    args = [str(tmp_path / "teacher")]
    single = subprocess.run([sys.executable, str(script), *args, str(tmp_path / "one"), mode], env=env,
                            capture_output=True, text=True, timeout=600, check=False)
    assert single.returncode == 0, single.stderr[-3000:]
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                            str(29700 + os.getpid() % 1000), str(script), *args, str(tmp_path / "two"), mode], env=env,
                           capture_output=True, text=True, timeout=600, check=False)
    assert multi.returncode == 0, multi.stderr[-3000:]
    one, two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        # same global batch and updates; only float32 reduction order differs
        for key in ("loss", "align/1", "align/3"):
            assert np.isclose(a[key], b[key], rtol=1e-5, atol=1e-7), (mode, a["step"], key)


if __name__ == "__main__":
    import sys

    _align_under(*sys.argv[1:4])


def test_a_stage_gives_swa_layers_the_windows_its_block_config_names(setup):
    teacher, config, _, _ = setup
    config = copy.copy(config)
    config.layer_types, config.block_config = "swa,gdn,swa,attn", {"swa": {"layer_windows": {"2": 3}}}
    student, types, block_config = build_student(config, teacher)
    windows = [getattr(layer.self_attn, "window_size", None) for layer in student.model.layers]
    assert types == ["swa", "gdn", "swa", "attn"] and windows == [6, None, 3, None]
    assert block_config["swa"] == {"window_size": 6, "layer_windows": {"2": 3}}
