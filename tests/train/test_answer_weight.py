"""Answer-weighted distillation (`StageConfig.answer_weight`): the answer flags a batcher adds from a recall source's
spans (`[B, 2, T + 1]`, `jetnas.train.mixture`) line up with the spans at the label positions; the weights reach
the loss of stage 1 and stage 2 (runs that train and log the unweighted kl / lm), through micro-batches,
`teacher_per_step`, the alignment phase and the static (CUDA-graph) step; at 1 nothing changes, bit for bit; and
the option is refused where it could not act.

Float32 on CPU throughout. "Bit for bit" comparisons are of the same ops in the same order (the static step against
the eager one; a weight of 1 against none); the others state their tolerance where they make it.
"""

import copy
import json

import numpy as np
import pytest
import torch

from jetnas.cli import main
from jetnas.models import JetNemotronForCausalLM
from jetnas.runner.recipes import TrainRecipe
from jetnas.train.align import make_align_loss
from jetnas.train.data import TokenStream, WindowBatcher
from jetnas.train.mixture import (
    AnswerWindowBatcher,
    MixtureBatcher,
    answer_token_mask,
    resolve_mixture,
    split_answer_flags,
)
from jetnas.train.recall_data import load_spans, spans_path
from jetnas.train.stages import StageConfig, make_stage_loss, set_trainable, stage_losses, train_stage
from jetnas.train.trainer import Trainer
from tests.utils import record_gradients, rel_err, save_tiny_llama, tiny_config

DOC = 32  # tokens per synthetic recall document; the windows below are one document (plus a label token)
SEQ, BATCH = 32, 4
VOCAB = 90  # ids < 90: valid for tiny_config's 97 and the tiny Llama's ~320


def write_recall_bin(path, documents=64, seed=0):
    """A recall-shaped `.bin` with its spans: each document of `DOC` random ids copies 2-5 of its first tokens to a
    later place (the answer, `[start, end)` with its source), some answers running to the document's last token and
    one past it into the next document (a span across a window edge), and two answers overlapping."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, VOCAB, documents * DOC)
    spans = []
    for d in range(documents):
        base, n = d * DOC, int(rng.integers(2, 6))
        source = base + int(rng.integers(1, 8))
        at = base + DOC - n if d % 5 == 0 else base + int(rng.integers(12, DOC - n))
        if d == 3:
            at = base + DOC - 2  # runs into document 4
        tokens[at : at + n] = tokens[source : source + n]
        spans.append((at, at + n, source, d % 2))
        if d == 7:
            spans.append((at + 1, at + n + 2, source, 0))  # overlapping the first
    TokenStream(tokens.astype("<u2"), name=path.name).save(path)
    np.save(spans_path(path), np.array(spans, dtype=np.int64))
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny Llama teacher on disk, a text-like token file and a recall `.bin` with spans; a private data cache."""
    root = tmp_path_factory.mktemp("answer_weight")
    save_tiny_llama(root / "teacher", num_layers=4)
    # text: a repeating pattern, learnable in a few steps
    TokenStream((np.arange(8000) % 23 + 3).astype("<u2"), name="web.bin").save(root / "web.bin")
    write_recall_bin(root / "recall.bin")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JETNAS_CACHE", str(root / "cache"))
        yield root


def mixture_spec(root) -> str:
    return f"{root / 'web.bin'}:0.5,{root / 'recall.bin'}:0.5"


def covered(spans: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Whether each absolute token position lies inside some span (the slow, obvious way)."""
    return np.array([bool(((spans[:, 0] <= p) & (p < spans[:, 1])).any()) for p in positions])


# -- the flags ---------------------------------------------------------------------------------------------------


def test_answer_token_mask_marks_every_span_and_refuses_foreign_spans():
    spans = np.array([[1, 3, 0, 0], [2, 5, 0, 1], [7, 7, 0, 0], [9, 10, 0, 0]])
    assert answer_token_mask(spans, 10).tolist() == [0, 1, 1, 1, 1, 0, 0, 0, 0, 1]
    assert answer_token_mask(np.zeros((0, 4), dtype=np.int64), 3).tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match=r"x.spans.npy: 1 answer spans lie outside its 10 tokens .* \[8, 11\)"):
        answer_token_mask(np.array([[1, 2], [8, 11]]), 10, "x.spans.npy")
    with pytest.raises(ValueError, match=r"end before they start, e.g. span 0: \[4, 3\)"):
        answer_token_mask(np.array([[4, 3]]), 10)


def test_batch_flags_line_up_with_the_spans_and_the_ids_are_todays(workspace):
    """Every row of every batch: channel 0 is the batch a batcher without flags gives (same windows, same ids),
    channel 1 is 1 exactly on the tokens inside a span (the window's tokens t = 0..T, so the label of position t is
    flag t + 1); text rows are all 0; ranks take the same rows of it as of the ids."""
    heldout = 2 * DOC
    mixture = resolve_mixture(mixture_spec(workspace), None, teacher_eos=0, heldout_tokens=heldout,
                              answer_spans=True)
    assert mixture.sources[0].answers is None and mixture.sources[1].answers is not None
    plain, flagged = mixture.batcher(SEQ, 8, seed=3), mixture.batcher(SEQ, 8, seed=3, answers=True)
    assert isinstance(flagged, MixtureBatcher) and flagged.answers is not None
    spans = load_spans(workspace / "recall.bin")
    recall_rows = flagged_tokens = 0
    for step in range(6):
        batch = flagged.batch(step)
        assert batch.shape == (8, 2, SEQ + 1) and batch.dtype == torch.int64
        ids, flags = split_answer_flags(batch)
        assert torch.equal(ids, plain.batch(step))
        for row, (k, w) in enumerate(flagged.windows(step)):
            want = covered(spans, w * SEQ + np.arange(SEQ + 1)) if k == 1 else np.zeros(SEQ + 1, dtype=bool)
            assert flags[row].numpy().astype(bool).tolist() == want.tolist(), (step, row)
            recall_rows += k == 1
            flagged_tokens += int(want.sum())
        for rank in range(2):
            assert torch.equal(flagged.batch(step, rank, 2), batch[rank * 4 : (rank + 1) * 4])
    assert recall_rows >= 10 and flagged_tokens > 0
    # one unweighted source: the plain WindowBatcher's windows and ids, with the flags of that source
    single = resolve_mixture(str(workspace / "recall.bin"), None, teacher_eos=0, heldout_tokens=heldout,
                             answer_spans=True)
    batcher = single.batcher(SEQ, 4, seed=1, answers=True)
    assert isinstance(batcher, AnswerWindowBatcher) and isinstance(batcher, WindowBatcher)
    reference = WindowBatcher(single.sources[0].stream, SEQ, 4, seed=1)
    for step in range(4):
        ids, flags = split_answer_flags(batcher.batch(step))
        assert torch.equal(ids, reference.batch(step))
        for row, w in enumerate(reference.windows(step)):
            assert flags[row].numpy().astype(bool).tolist() == covered(spans, w * SEQ + np.arange(SEQ + 1)).tolist()


def test_the_weight_of_a_position_is_its_labels_flag():
    """One flagged token at index j of the window: only position j - 1 (whose label it is) is weighted. The loss at
    answer_weight 4 minus the loss at 1 is 3 x that position's KL / N, the KL taken from the full logits (float32:
    1e-4 of the difference, which is ~1/N of the loss: the two stage losses round at the loss's scale)."""
    torch.manual_seed(0)
    teacher = JetNemotronForCausalLM(tiny_config(["attn"] * 2)).eval().requires_grad_(False)
    student = JetNemotronForCausalLM(tiny_config(["attn", "gdn"])).eval()
    ids = torch.randint(1, VOCAB, (2, SEQ + 1))
    flags = torch.zeros_like(ids)
    j = 9
    flags[1, j] = 1
    batch = torch.stack([ids, flags], dim=1)
    cfg = {"stage": 1, "layer_types": "attn*2", "precision": "fp32", "seq_len": SEQ}
    plain_cfg = StageConfig(**cfg)
    with torch.no_grad():
        base, base_m = stage_losses(plain_cfg, student, teacher, ids)
        # the stage config's spans check reads the data spec; the loss itself only reads the flags
        weighted_cfg = copy.copy(plain_cfg)
        weighted_cfg.answer_weight = 4.0
        got, got_m = stage_losses(weighted_cfg, student, teacher, batch)
        z = student(input_ids=ids[:, :-1]).logits.float()
        zt = teacher(input_ids=ids[:, :-1]).logits.float()
    log_p, log_q = zt.log_softmax(-1), z.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # [2, SEQ]
    assert rel_err(got - base, 3 * kl[1, j - 1] / kl.numel()) < 1e-4
    # the metrics are the unweighted terms, bit for bit the plain batch's
    assert all(torch.equal(got_m[k], base_m[k]) for k in ("hidden", "kl", "lm"))


@pytest.mark.parametrize("stage", [1, 2])
def test_the_full_logits_path_weights_as_the_fused_head_does(monkeypatch, stage):
    """A head sharded by FSDP2 takes the full-logits losses (`logits_kl` / `lm_loss` with their token_weight): the
    same loss, metrics and gradients as the fused head's chunked loss (float32: 1e-5, as tests/ops/test_losses.py
    states for the two paths)."""
    from jetnas.train import stages

    torch.manual_seed(0)
    teacher = JetNemotronForCausalLM(tiny_config(["attn"] * 2)).eval().requires_grad_(False)
    student = JetNemotronForCausalLM(tiny_config(["attn", "gdn"]))
    ids = torch.randint(1, VOCAB, (3, SEQ + 1))
    batch = torch.stack([ids, (torch.rand(ids.shape) < 0.2).long()], dim=1)
    config = copy.copy(StageConfig(stage=stage, layer_types="attn*2", precision="fp32", seq_len=SEQ, kl_weight=1.0))
    config.answer_weight = 4.0  # (set after the spans check, which reads a data spec this test has none of)
    params = [p for p in student.parameters() if p.requires_grad]
    results = []
    for fused in (True, False):
        monkeypatch.setattr(stages, "_fused_head", lambda model, fused=fused: fused)
        loss, metrics = stage_losses(config, student, teacher, batch)
        results.append((loss, metrics, torch.autograd.grad(loss, params)))
    (loss, metrics, grads), (ref_loss, ref_metrics, ref_grads) = results
    assert rel_err(loss, ref_loss) < 1e-5
    assert metrics.keys() == ref_metrics.keys() and all(rel_err(metrics[k], ref_metrics[k]) < 1e-5 for k in metrics)
    assert all(rel_err(g, r) < 1e-5 for g, r in zip(grads, ref_grads))
    weights = {"hidden": config.hidden_weight, "kl": config.kl_weight, "lm": config.lm_weight}
    plain = sum(weights[k] * ref_metrics[k] for k in weights)
    assert rel_err(ref_loss, plain) > 1e-3  # the weights are in it


# -- answer_weight 1: today's training ---------------------------------------------------------------------------


def stage1_config(workspace, out, **overrides):
    args = dict(stage=1, teacher=str(workspace / "teacher"), layer_types="attn,jet-dyn-qk*2,swa", swa_window=8,
                data=mixture_spec(workspace), steps=12, batch_size=BATCH, seq_len=SEQ, lr=3e-3, heldout_tokens=256,
                eval_windows=2, out_dir=str(workspace / out), device="cpu", precision="fp32")
    return StageConfig(**{**args, **overrides})


def log(out_dir) -> list[dict]:
    rows = [json.loads(x) for x in (out_dir / "log.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("tokens_per_s", None)
        r.pop("time", None)
    return [r for r in rows if "loss" in r]


def test_answer_weight_one_is_todays_training_bit_for_bit(workspace, tmp_path):
    """A recall mixture at answer_weight 1.0: the same logged losses, metrics and gradient norms as the same run
    with the spans file gone (so nothing of the spans can reach it: today's code path) and its batches are plain
    ids; answer_weight 4 on the same data does change them (so the comparison can fail)."""
    root = tmp_path / "data"
    root.mkdir()
    TokenStream((np.arange(8000) % 23 + 3).astype("<u2"), name="web.bin").save(root / "web.bin")
    write_recall_bin(root / "recall.bin")
    runs = {}
    for name, weight in (("one", 1.0), ("four", 4.0)):
        train_stage(stage1_config(workspace, f"aw-{name}", data=mixture_spec(root), steps=4, answer_weight=weight,
                                  save_model=False))
        runs[name] = log(workspace / f"aw-{name}")
    spans_path(root / "recall.bin").unlink()
    train_stage(stage1_config(workspace, "aw-none", data=mixture_spec(root), steps=4, save_model=False))
    assert runs["one"] == log(workspace / "aw-none")
    assert runs["four"] != runs["one"]
    assert [r["kl"] for r in runs["four"]][0] == [r["kl"] for r in runs["one"]][0]  # the same first step's metric
    assert json.loads((workspace / "aw-one" / "run.json").read_text())["identity"].get("answer_weight") is None


# -- stage runs with answer weights ------------------------------------------------------------------------------


def answer_steps(workspace, config) -> list[bool]:
    """Whether each step's batch holds a flagged label (so its weighted loss exceeds the unweighted one)."""
    mixture = resolve_mixture(config.data, None, teacher_eos=0, heldout_tokens=config.heldout_tokens,
                              answer_spans=True)
    batcher = mixture.batcher(config.seq_len, config.batch_size, config.seed, answers=True)
    return [bool(split_answer_flags(batcher.batch(s))[1][:, 1:].any()) for s in range(config.steps)]


@pytest.fixture(scope="module")
def stage1_run(workspace):
    config = stage1_config(workspace, "stage1", answer_weight=4.0, align_steps=2)
    return config, train_stage(config)


def test_stage1_with_answer_weights_trains_and_logs_unweighted_terms(workspace, stage1_run):
    """The loss falls; each step's logged loss is hidden + weighted KL while `kl` is the unweighted mean: strictly
    above hidden + kl on the steps whose batch holds answers (the weighted part), equal (float32: 1e-6) on the
    others; the held-out evaluation is the plain one; the alignment phase ran on the same data."""
    config, result = stage1_run
    rows = log(workspace / "stage1")
    assert len(rows) == config.steps
    losses = [r["loss"] for r in rows]
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])
    with_answers = answer_steps(workspace, config)
    assert any(with_answers)
    for r, answered in zip(rows, with_answers):
        extra = r["loss"] - (r["hidden"] + r["kl"])
        assert extra > 1e-4 * r["kl"] if answered else abs(extra) <= 1e-6 * r["loss"], r
    assert set(result.summary["eval"]) >= {"heldout/hidden", "heldout/kl", "heldout/lm"}
    assert result.summary["align"]["steps"] == 2
    saved = json.loads((workspace / "stage1" / "stage_config.json").read_text())
    assert saved["answer_weight"] == 4.0
    assert json.loads((workspace / "stage1" / "run.json").read_text())["identity"]["answer_weight"] == 4.0


def test_stage2_with_answer_weights_trains_and_logs_unweighted_terms(workspace, stage1_run):
    """Stage 2 (cross-entropy + KL, everything trains) on the same mixture: the loss and the unweighted lm fall
    (seen: by 19% and 28% over 16 steps), and loss = weighted (kl + lm) lies above the logged unweighted kl + lm
    exactly on the steps with answers."""
    _, first = stage1_run
    config = StageConfig(stage=2, teacher=str(workspace / "teacher"), model=str(first.model_dir),
                         data=mixture_spec(workspace), steps=16, batch_size=BATCH, seq_len=SEQ, lr=1e-2,
                         kl_weight=1.0, heldout_tokens=256, eval_windows=2, answer_weight=4.0,
                         out_dir=str(workspace / "stage2"), device="cpu", precision="fp32", save_model=False)
    train_stage(config)
    rows = log(workspace / "stage2")
    # (the loss swings with each batch's share of random recall documents and of answers: means of four steps)
    losses, lm = [r["loss"] for r in rows], [r["lm"] for r in rows]
    assert np.mean(losses[-4:]) < 0.9 * np.mean(losses[:4]) and np.mean(lm[-4:]) < 0.8 * np.mean(lm[:4])
    for r, answered in zip(rows, answer_steps(workspace, config)):
        extra = r["loss"] - (r["kl"] + r["lm"])
        assert extra > 1e-4 * r["lm"] if answered else abs(extra) <= 1e-6 * r["loss"], r


def test_the_alignment_loss_reads_the_ids_of_a_flagged_batch():
    torch.manual_seed(0)
    teacher = JetNemotronForCausalLM(tiny_config(["attn"] * 2)).eval().requires_grad_(False)
    from jetnas.train.align import LayerAligner

    aligner = LayerAligner(JetNemotronForCausalLM(tiny_config(["attn", "gdn"])), [1])
    ids = torch.randint(1, VOCAB, (2, SEQ + 1))
    batch = torch.stack([ids, (ids % 3 == 0).long()], dim=1)
    loss_fn = make_align_loss(teacher)
    plain, _ = loss_fn(aligner, {"input_ids": ids}, 0)
    flagged, _ = loss_fn(aligner, {"input_ids": batch}, 0)
    assert torch.equal(plain, flagged)


# -- the trainer's paths: micro-batches, teacher_per_step, the static step ------------------------------------------




def make(models, recall, out_dir, *, graph=False, stage=1, micro=None, per_step=False, weight=4.0, steps=5):
    """A stage trainer on a copy of the tiny student over the recall `.bin` alone, its batches flagged."""
    teacher, student = models
    config = StageConfig(stage=stage, layer_types="attn*4", data=str(recall), batch_size=BATCH,
                         micro_batch_size=micro, teacher_per_step=per_step, seq_len=SEQ, steps=steps, warmup_steps=1,
                         precision="fp32", answer_weight=weight, kl_weight=1.0 if stage == 2 else None,
                         out_dir=str(out_dir))
    model = copy.deepcopy(student)
    set_trainable(model, stage)
    train = config.train_config()
    train.cuda_graph = graph
    stream = TokenStream.from_file(recall)
    trainer = Trainer(train, model, make_stage_loss(config, teacher), stream)
    trainer.batcher = resolve_mixture(str(recall), None, teacher_eos=0, answer_spans=True).batcher(
        SEQ, BATCH, 0, answers=True)
    return trainer, model


@pytest.mark.parametrize(("stage", "micro", "per_step"), [(1, None, False), (1, 2, True), (2, 2, False)],
                         ids=["stage1", "stage1-micro-teacher-per-step", "stage2-micro"])
def test_static_steps_with_answer_weights_equal_eager_steps_bit_for_bit(models, workspace, tmp_path, cpu_graph,
                                                                       stage, micro, per_step):
    """Five steps (two eager warm-ups, the capture step and its checked replay, two replays): the flagged batch is
    copied into the static buffer `[B, 2, T + 1]` like any batch, and the same losses, gradients and weights come
    out as from the eager steps."""
    recall = workspace / "recall.bin"
    eager, eager_model = make(models, recall, tmp_path / "eager", stage=stage, micro=micro, per_step=per_step)
    static, static_model = make(models, recall, tmp_path / "static", graph=True, stage=stage, micro=micro,
                                per_step=per_step)
    ge, gs = record_gradients(eager, eager_model), record_gradients(static, static_model)
    eager.fit()
    assert static.fit()["cuda_graph"]["fallback"] is None
    assert static._static.checked and tuple(static._static.batch.shape) == (BATCH, 2, SEQ + 1)
    assert log(eager.out) == log(static.out)
    for x, y in zip(ge, gs, strict=True):
        assert all(torch.equal(x[n], y[n]) for n in x)
    for (n, p), (_, q) in zip(eager_model.named_parameters(), static_model.named_parameters()):
        assert torch.equal(p, q), n


def test_micro_batches_and_teacher_per_step_give_the_whole_batch_step(models, workspace, tmp_path):
    """The weighted loss is a mean over positions, so micro-batches of equal size average to the whole batch's
    loss and gradient, and the teacher run once per step gives each micro-batch its rows. Three runs of three
    steps: logged terms and final weights within float32 rounding of a differently split sum (1e-5)."""
    recall = workspace / "recall.bin"
    runs = []
    for name, micro, per_step in (("whole", None, False), ("micro", 2, False), ("per-step", 2, True)):
        trainer, model = make(models, recall, tmp_path / name, micro=micro, per_step=per_step, steps=3)
        grads = record_gradients(trainer, model)
        trainer.fit()
        runs.append((log(trainer.out), grads))
    (whole, whole_grads), *others = runs
    for rows, grads in others:
        for a, b in zip(rows, whole, strict=True):
            for k in ("loss", "hidden", "kl", "lm", "grad_norm"):
                assert abs(a[k] - b[k]) <= 1e-5 * abs(b[k]), k
        # the first step's gradients (from the same weights; later steps' weights differ by AdamW's amplification
        # of float32 noise in near-zero gradients, which says nothing about the loss)
        for n, g in whole_grads[0].items():
            assert rel_err(grads[0][n], g) < 1e-5, n
    # and the weights are in these losses: answer_weight 1 on the same batches logs another loss
    plain, _ = make(models, recall, tmp_path / "plain", weight=1.0, steps=3)
    plain.fit()
    assert [r["loss"] for r in log(plain.out)] != [r["loss"] for r in whole]


# -- refusals ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf"), True])
def test_answer_weight_must_be_a_positive_number(value):
    with pytest.raises(ValueError, match=rf"StageConfig.answer_weight={value!r} must be a finite number > 0"):
        StageConfig(stage=1, layer_types="attn*4", answer_weight=value)


def test_answer_weight_needs_a_source_with_spans(workspace, tmp_path):
    no_spans = tmp_path / "plain-recall.bin"
    TokenStream(np.arange(100, dtype="<u2")).save(no_spans)
    for data, named in [(None, "text the teacher generates"),
                        (str(workspace / "web.bin"), str(workspace / "web.bin")),
                        (f"{workspace / 'web.bin'}:0.5,{no_spans}:0.5", str(no_spans))]:
        with pytest.raises(ValueError, match="no source of the data carries answer spans") as err:
            StageConfig(stage=1, layer_types="attn*4", data=data, answer_weight=4.0)
        assert named in str(err.value) and "answer_weight=4.0" in str(err.value)
    # a spans file beside any source of a mixture is enough; so is the default weight without one
    StageConfig(stage=1, layer_types="attn*4", data=mixture_spec(workspace), answer_weight=4.0)
    StageConfig(stage=1, layer_types="attn*4", data=str(workspace / "web.bin"), answer_weight=1.0)
    mixture = resolve_mixture(str(workspace / "web.bin"), None, teacher_eos=0, answer_spans=True)
    with pytest.raises(ValueError, match="answer flags need a source with answer spans"):
        mixture.batcher(SEQ, BATCH, answers=True)


def test_recipes_take_answer_weight(capsys):
    with pytest.raises(ValueError, match="--answer-weight must be > 0, got 0.0"):
        TrainRecipe(stage=1, answer_weight=0.0)
    assert TrainRecipe(stage=2, answer_weight=4.0).answer_weight == 4.0
    assert main(["run", "smollm2-135m-gpu-final-4k-dense", "--check", "--set", "stages.stage1.answer_weight=4",
                 "--set", "stages.stage2.answer_weight=4"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["valid"]
    assert main(["run", "smollm2-135m-gpu-final-4k-dense-aw4", "--check"]) == 0
    capsys.readouterr()
    assert main(["run", "smollm2-135m-gpu-final-4k-dense", "--check", "--set", "stages.stage1.answer_weight=-2"]) == 2
    assert "stages.stage1.answer_weight must be > 0, got -2" in capsys.readouterr().err
