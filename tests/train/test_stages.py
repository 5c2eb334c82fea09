"""The two training stages on a tiny Llama teacher saved to disk: stage 1 trains exactly the token mixers and lowers
the distillation loss, stage 2 trains everything on a data mixture and lowers the LM loss, the saved directory
loads with the Auto classes and gives the same logits, and mixture sampling is deterministic, follows its weights,
and resumes exactly."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from jetnas.cli import main
from jetnas.train.data import TokenStream, WindowBatcher
from jetnas.train.mixture import Mixture, MixtureBatcher, Source, parse_mixture, resolve_mixture
from jetnas.train.stages import StageConfig, load_stage_teacher, set_trainable, train_stage
from jetnas.train.trainer import TrainConfig, Trainer
from tests.utils import _CORPUS, rel_err, save_tiny_llama, tiny_tokenizer

L = 4


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny Llama teacher (with tokenizer) on disk, a text file and a token file, and a private data cache."""
    root = tmp_path_factory.mktemp("stages")
    save_tiny_llama(root / "teacher", num_layers=L)
    (root / "train.txt").write_text(_CORPUS * 20)
    # a second source with a pattern a model learns in a few steps
    (np.arange(6000) % 7 + 10).astype("<u2").tofile(root / "pattern.bin")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JETNAS_CACHE", str(root / "cache"))
        yield root


def losses(out_dir) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out_dir / "log.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def stage1(workspace):
    config = StageConfig(stage=1, teacher=str(workspace / "teacher"), layer_types="attn,jet-dyn-qk*2,swa",
                         swa_window=8, data=str(workspace / "train.txt"), steps=24, batch_size=4, seq_len=32,
                         lr=3e-3, heldout_tokens=256, out_dir=str(workspace / "stage1"), device="cpu")
    return config, train_stage(config)


def test_stage1_trains_exactly_the_token_mixers_and_lowers_the_distillation_loss(workspace, stage1):
    _, result = stage1
    trained = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert trained == {n for n, _ in result.model.named_parameters() if ".self_attn." in n}
    assert result.counts["trainable_parameters"] < result.counts["parameters"]
    # frozen weights are still the teacher's, bit for bit; the mixers moved
    teacher = load_stage_teacher(str(workspace / "teacher"))
    t_params, s_params = dict(teacher.model.named_parameters()), dict(result.model.named_parameters())
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.up_proj.weight", "model.norm.weight",
                 "model.layers.2.post_attention_layernorm.weight"):
        assert torch.equal(s_params[name], t_params[name]), name
    assert not torch.equal(s_params["model.layers.0.self_attn.q_proj.weight"],
                           t_params["model.layers.0.self_attn.q_proj.weight"])
    log = losses(workspace / "stage1")
    assert len(log) == 24 and np.mean(log[-4:]) < 0.5 * np.mean(log[:4])
    assert set(result.summary["eval"]) == {"heldout/hidden", "heldout/kl", "heldout/lm"}
    assert result.layer_types == ["attn", "jet", "jet", "swa"]
    assert result.block_config == {"jet": {"qk_conv": "dynamic", "v_conv": "static"}, "swa": {"window_size": 8}}
    saved = json.loads((workspace / "stage1" / "stage_config.json").read_text())
    assert saved["stage"] == 1 and saved["kl_weight"] == 1.0 and saved["lm_weight"] == 0.0
    assert saved["layer_types"] == result.layer_types and saved["trainable_parameters"] == result.counts[
        "trainable_parameters"]


def test_saved_model_loads_with_auto_classes_and_gives_the_same_logits(stage1):
    import jetnas  # noqa: F401  (registers jet_nemotron with the Auto classes)

    _, result = stage1
    loaded = AutoModelForCausalLM.from_pretrained(result.model_dir).eval()
    assert (result.model_dir / "model.safetensors").exists()
    assert not list(result.model_dir.glob("*.bin")) and not list(result.model_dir.glob("*.pt"))
    assert loaded.config.block_types == ["attn", "jet", "jet", "swa"]
    assert loaded.model.layers[1].self_attn.qk_conv == "dynamic"  # the design option survived the round trip
    ids = torch.randint(0, loaded.config.vocab_size, (2, 40))
    with torch.no_grad():
        expected, got = result.model.eval()(input_ids=ids).logits, loaded(input_ids=ids).logits
    # the same float32 weights and code: only summation order could differ, and does not
    assert rel_err(got, expected) < 1e-6
    tok = AutoTokenizer.from_pretrained(result.model_dir)
    assert len(tok) == len(tiny_tokenizer())
    meta = json.loads((result.model_dir / "jetnas_stage.json").read_text())
    assert meta["stage"] == 1 and meta["layer_types"] == ["attn", "jet", "jet", "swa"]


def test_stage2_trains_everything_on_a_mixture_and_lowers_the_lm_loss(workspace, stage1):
    _, first = stage1
    data = f"{workspace / 'train.txt'}:0.5,{workspace / 'pattern.bin'}:0.5"
    config = StageConfig(stage=2, teacher=str(workspace / "teacher"), model=str(first.model_dir), data=data,
                         steps=24, batch_size=4, seq_len=32, lr=3e-3, heldout_tokens=256,
                         out_dir=str(workspace / "stage2"), device="cpu")
    assert (config.lm_weight, config.kl_weight, config.hidden_weight) == (1.0, 0.0, 0.0)
    result = train_stage(config)
    assert all(p.requires_grad for p in result.model.parameters())
    start = AutoModelForCausalLM.from_pretrained(first.model_dir)
    assert not torch.equal(result.model.model.embed_tokens.weight, start.model.embed_tokens.weight)
    assert not torch.equal(result.model.model.layers[1].mlp.up_proj.weight, start.model.layers[1].mlp.up_proj.weight)
    log = losses(workspace / "stage2")
    assert np.mean(log[-4:]) < 0.85 * np.mean(log[:4])
    assert [s["weight"] for s in result.mixture.describe()] == [0.5, 0.5]
    assert {"heldout/lm", "heldout/lm/train.txt", "heldout/lm/pattern.bin"} <= set(result.summary["eval"])
    assert result.layer_types == first.layer_types  # the architecture comes from the stage-1 directory


@pytest.mark.slow
def test_train_command_runs_both_stages(workspace, capsys):
    out1, out2 = workspace / "cli1", workspace / "cli2"
    common = ["--teacher", str(workspace / "teacher"), "--data", str(workspace / "train.txt"), "--steps", "3",
              "--batch-size", "2", "--seq-len", "16", "--heldout-tokens", "64", "--device", "cpu"]
    assert main(["train", "--stage", "1", "--layer-types", "attn,gdn,jet,attn", "--block-config",
                 '{"jet": {"num_heads": 2, "head_dim": 8, "expand_v": 1}}', "--out-dir", str(out1), *common]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["model_dir"] == str(out1 / "model") and first["steps"] == 3
    assert first["block_config"] == {"jet": {"num_heads": 2, "head_dim": 8, "expand_v": 1}}
    assert main(["train", "--stage", "2", "--model", first["model_dir"], "--kl-weight", "0.5", "--out-dir",
                 str(out2), *common]) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["trainable_parameters"] == second["parameters"] and second["layer_types"] == "attn,gdn,jet,attn"
    assert "heldout/kl" in second["eval"]
    # the same command again: the run is complete, nothing more trains
    assert main(["train", "--stage", "2", "--model", first["model_dir"], "--kl-weight", "0.5", "--out-dir",
                 str(out2), *common]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 3
    assert len(losses(out2)) == 3


@pytest.mark.parametrize("kwargs, match", [
    (dict(stage=3, layer_types="attn"), "must be 1 or 2"),
    (dict(stage=1), "exactly one of model"),
    (dict(stage=1, layer_types="attn", model="x"), "exactly one of model"),
    (dict(stage=1, layer_types="attn", hidden_weight=0.0, kl_weight=0.0), "cannot both be 0"),
    (dict(stage=2, layer_types="attn", lm_weight=0.0), "lm_weight=0.0 must be > 0"),
    (dict(stage=2, layer_types="attn", kl_weight=-1.0), r"kl_weight=-1.0 must be >= 0"),
    (dict(stage=1, layer_types="attn", steps=0), r"TrainConfig.steps=0"),
], ids=["stage", "neither", "both", "no-distillation", "no-lm", "negative", "steps"])
def test_stage_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StageConfig(**kwargs)


def test_set_trainable_counts():
    from tests.train.test_trainer import tiny_model

    model = tiny_model()
    counts = set_trainable(model, 1)
    mixers = sum(p.numel() for n, p in model.named_parameters() if ".self_attn." in n)
    assert counts["trainable_parameters"] == mixers < counts["parameters"]
    assert set_trainable(model, 2)["trainable_parameters"] == counts["parameters"]


# ---------------------------------------------------------------------------------------------------------------
# data mixtures


def test_parse_mixture():
    assert parse_mixture("a.bin:0.7,b.txt:0.3") == [("a.bin", 0.7), ("b.txt", 0.3)]
    assert parse_mixture("a.bin:3,hf:wikitext:wikitext-2-raw-v1@train:1") == [
        ("a.bin", 0.75), ("hf:wikitext:wikitext-2-raw-v1@train", 0.25)]
    assert parse_mixture("a.txt,b.txt") is None  # no weights: one concatenated source, as before
    with pytest.raises(ValueError, match=r"these have none: \['b.txt'\]"):
        parse_mixture("a.bin:0.5,b.txt")
    with pytest.raises(ValueError, match="weight of 'b.txt' is 0.0"):
        parse_mixture("a.bin:0.5,b.txt:0")
    with pytest.raises(ValueError, match="lists a source twice"):
        parse_mixture("a.bin:0.5,a.bin:0.5")


def streams(sizes=(4001, 801, 1601)) -> list[TokenStream]:
    # source k's tokens are 1000 * k + position: every window tells which source and where it came from
    return [TokenStream((np.arange(n) + 1000 * k).astype("<u2")) for k, n in enumerate(sizes)]


def test_mixture_sampling_follows_the_weights_and_visits_each_source_without_repeats():
    weights = [0.6, 0.1, 0.3]
    batcher = MixtureBatcher(list(zip(streams(), weights)), seq_len=8, batch_size=16, seed=3)
    picks = [batcher.windows(step) for step in range(250)]
    flat = [p for step in picks for p in step]
    counts = np.zeros(3)
    for n, (k, _) in enumerate(flat, 1):
        counts[k] += 1
        # low discrepancy: every prefix within a few samples of the exact proportions (i.i.d. draws: ~sqrt(n))
        assert np.abs(counts - n * np.array(weights)).max() <= 4, n
    for k, source in enumerate(batcher.sources):
        seen = [w for kk, w in flat if kk == k][: source.num_windows]
        assert sorted(seen) == list(range(source.num_windows))  # one pass over the source, in a shuffled order
    batch = batcher.batch(7)
    for row, (k, w) in zip(batch, picks[7]):
        assert torch.equal(row, torch.arange(w * 8, w * 8 + 9) + 1000 * k)


def test_mixture_sampling_is_a_pure_function_of_seed_and_step():
    data = list(zip(streams(), [0.5, 0.2, 0.3]))
    sequential = MixtureBatcher(data, 8, 6, seed=1)
    expected = [sequential.windows(s) for s in range(60)]
    fresh = MixtureBatcher(data, 8, 6, seed=1)
    assert fresh.windows(41) == expected[41]  # random access, as a resumed run does
    assert fresh.windows(3) == expected[3]  # and backwards
    assert fresh.windows(59) == expected[59]
    assert MixtureBatcher(data, 8, 6, seed=2).windows(5) != expected[5]
    assert torch.equal(torch.cat([sequential.batch(9, r, 3) for r in range(3)]), sequential.batch(9))


def test_a_training_run_on_a_mixture_resumes_bit_identically(tmp_path):
    from tests.train.test_trainer import lm_loss, tiny_model

    mixture = Mixture([Source(f"s{k}", s, w) for k, (s, w) in enumerate(zip(
        [TokenStream((np.arange(3000) % p).astype("<u2")) for p in (5, 7)], [0.7, 0.3]))], weighted=True)

    def run(name, steps, total):
        model = tiny_model()
        cfg = TrainConfig(steps=total, batch_size=4, seq_len=16, lr=1e-3, warmup_steps=2, save_every=1,
                          out_dir=str(tmp_path / name))
        trainer = Trainer(cfg, model, lm_loss, mixture.sources[0].stream)
        trainer.batcher = mixture.batcher(16, 4, seed=0)
        # an interruption after `steps`; the schedule reads cfg.steps, but the steps before it are warm-up or
        # the first step after it, where the cosine has not moved yet, so the learning rates are the full run's
        cfg.steps = steps
        trainer.fit()
        return model

    full = run("full", 6, 6)
    run("split", 3, 6)
    resumed = run("split", 6, 6)
    assert losses(tmp_path / "full") == losses(tmp_path / "split")
    for (n, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n


def test_an_unweighted_spec_keeps_the_plain_batcher(workspace):
    tok = tiny_tokenizer()
    mixture = resolve_mixture(str(workspace / "pattern.bin"), tok, teacher_eos=tok.eos_token_id, heldout_tokens=100)
    assert not mixture.weighted and len(mixture.heldout()) == 100
    plain = WindowBatcher(mixture.sources[0].stream, 16, 4, seed=5)
    assert torch.equal(mixture.batcher(16, 4, seed=5).batch(3), plain.batch(3))
    weighted = resolve_mixture(f"{workspace / 'pattern.bin'}:1,{workspace / 'train.txt'}:1", tok,
                               teacher_eos=tok.eos_token_id, heldout_tokens=100)
    assert weighted.weighted and len(weighted.heldout()) == 200
    assert isinstance(weighted.batcher(16, 4), MixtureBatcher)


@pytest.mark.slow(seconds=31)
def test_torchrun_two_processes_match_one(workspace, tmp_path):
    """A stage under torchrun (gloo, 2 processes, DDP and FSDP): the same losses as one process, and one saved model
    directory (gathered from both ranks) with the same weights. Hidden-state and KL terms both: each is a mean
    of per-sequence (per-token) terms, so two half batches average to the whole batch's value."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    args = ["train", "--stage", "1", "--teacher", str(workspace / "teacher"), "--layer-types", "attn,jet,gdn,jet",
            "--data", str(workspace / "train.txt"), "--steps", "4", "--batch-size", "4", "--seq-len", "16",
            "--heldout-tokens", "64", "--device", "cpu"]
    single = subprocess.run([sys.executable, "-m", "jetnas.cli", *args, "--out-dir", str(tmp_path / "one")], env=env,
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "model")
    for port, mode in enumerate(("ddp", "fsdp"), 28500 + os.getpid() % 1000):
        multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                                "--master-port", str(port), "-m", "jetnas.cli", *args, "--distributed", mode,
                                "--out-dir", str(tmp_path / mode)], env=env, capture_output=True, text=True,
                               timeout=600)
        assert multi.returncode == 0, multi.stderr[-3000:]
        one, two = losses(tmp_path / "one"), losses(tmp_path / mode)
        assert len(one) == len(two) == 4
        # same global batch, same data, same updates; only float32 reduction order differs
        assert np.allclose(one, two, rtol=1e-5, atol=1e-6), mode
        saved = AutoModelForCausalLM.from_pretrained(tmp_path / mode / "model")
        for (name, x), (_, y) in zip(reference.named_parameters(), saved.named_parameters()):
            assert torch.allclose(x, y, rtol=1e-4, atol=1e-6), (mode, name)


@pytest.mark.parametrize("stage,extra", [(1, {}), (2, {"kl_weight": 0.5, "temperature": 2.0, "hidden_weight": 0.3})],
                         ids=["stage1", "stage2-kl-T2"])
def test_stage_losses_without_logits_equal_the_logits_formulation(stage, extra):
    """The stage loss takes its KL and cross-entropy from the final normed states through the chunked LM-head
    terms (no [B, T, V] logits): the same loss, terms and gradients as the full-logits formulation (float32:
    the chunks sum in another order, ~1e-6 relative; the KL, a small difference of large sums, within 1e-4)."""
    import copy

    from jetnas.models import JetNemotronForCausalLM
    from jetnas.train.losses import distill_terms, lm_loss
    from jetnas.train.stages import stage_losses
    from tests.utils import rel_err, tiny_config

    torch.manual_seed(0)
    teacher = JetNemotronForCausalLM(tiny_config(["attn"] * 4)).eval().requires_grad_(False)
    student = JetNemotronForCausalLM(tiny_config(["attn", "gdn", "swa", "jet"]))
    config = StageConfig(stage=stage, layer_types="attn*4", **extra)
    ids = torch.randint(0, 97, (3, 17))

    def full_logits(model):
        inputs, labels = ids[:, :-1], ids[:, 1:]
        t_out = teacher(input_ids=inputs, use_cache=False, output_hidden_states=True)
        s_out = model(input_ids=inputs, use_cache=False, output_hidden_states=True)
        terms = distill_terms(s_out.hidden_states[1:], t_out.hidden_states[1:], s_out.logits, t_out.logits,
                              config.temperature)
        lm = lm_loss(s_out.logits, labels)
        loss = config.hidden_weight * terms["hidden"] + config.kl_weight * terms["kl"] + config.lm_weight * lm
        return loss, {"hidden": terms["hidden"], "kl": terms["kl"], "lm": lm}

    results = []
    for fn in (full_logits, lambda m: stage_losses(config, m, teacher, ids)):
        model = copy.deepcopy(student)
        loss, metrics = fn(model)
        loss.backward()
        results.append((loss.detach(), metrics, [p.grad for p in model.parameters()]))
    (want, want_terms, want_grads), (got, got_terms, got_grads) = results
    assert rel_err(got, want) < 1e-5
    assert set(got_terms) == {"hidden", "kl", "lm"} and all(not v.requires_grad for v in got_terms.values())
    for name in ("hidden", "lm"):
        assert rel_err(got_terms[name], want_terms[name]) < 1e-5, name
    assert rel_err(got_terms["kl"], want_terms["kl"]) < 1e-4
    for g, g_want in zip(got_grads, want_grads):
        assert (g is None) == (g_want is None)
        if g is not None:
            assert rel_err(g, g_want) < 1e-4


def test_stage1_alignment_phase_runs_first_and_starts_stage1_lower(workspace, tmp_path):
    """`align_steps`: stage 1 first aligns each linear block to its teacher layer (jetnas.train.align) in
    out_dir/align, then distils end to end from there; the aligned hybrid's first stage-1 loss is below an
    unaligned one's (same seed and data), and a resumed stage skips the finished alignment."""
    common = dict(stage=1, teacher=str(workspace / "teacher"), layer_types="attn,gdn,gdn,swa", swa_window=8,
                  data=str(workspace / "train.txt"), steps=3, batch_size=2, seq_len=32, heldout_tokens=256,
                  device="cpu")
    aligned = train_stage(StageConfig(**common, align_steps=6, out_dir=str(tmp_path / "aligned")))
    train_stage(StageConfig(**common, out_dir=str(tmp_path / "plain")))
    assert aligned.summary["align"]["steps"] == 6 and (tmp_path / "aligned" / "align" / "log.jsonl").exists()
    first = {name: losses(tmp_path / name)[0] for name in ("aligned", "plain")}
    assert first["aligned"] < first["plain"], first
    again = train_stage(StageConfig(**common, align_steps=6, out_dir=str(tmp_path / "aligned")))
    assert "skipped" in again.summary["align"]
    with pytest.raises(ValueError, match="alignment phase belongs to stage 1"):
        StageConfig(stage=2, model=str(tmp_path / "plain" / "model"), align_steps=3)


def test_bf16_stage_runs_the_teacher_from_a_cast_copy_with_the_same_losses(workspace, monkeypatch):
    # issue 16: under bf16 autocast the frozen teacher's Linear weights are cast once (jetnas.train.frozen), not by
    # autocast in every forward; autocast's own cast rounds the same way, so the losses are equal, not merely close
    from jetnas.train import stages

    made = []

    def spy(model, dtype):
        made.append(dtype)
        return stages_copy(model, dtype)

    stages_copy = stages.autocast_copy

    def run(name):
        config = StageConfig(stage=1, teacher=str(workspace / "teacher"), layer_types="attn,gdn*2,swa", swa_window=8,
                             data=str(workspace / "train.txt"), steps=3, batch_size=2, seq_len=32, lr=3e-3,
                             heldout_tokens=256, eval_every=3, precision="bf16", out_dir=str(workspace / name),
                             device="cpu")
        return train_stage(config), losses(workspace / name)

    monkeypatch.setattr(stages, "autocast_copy", spy)
    fast, fast_losses = run("bf16_copy")
    assert made == [torch.bfloat16]
    monkeypatch.setattr(stages, "autocast_copy", lambda model, dtype: model)
    slow, slow_losses = run("bf16_autocast")
    assert fast_losses == slow_losses and len(fast_losses) == 3
    assert fast.summary["eval"] == slow.summary["eval"]


def test_stage_eval_tasks_score_the_student_at_each_evaluation(workspace, tmp_path):
    """`eval_tasks`: built-in tasks scored on the student beside the held-out losses at every evaluation (logged as
    eval/task/<spec>/<metric>); the final figures equal the same task run on the saved model afterwards."""
    from jetnas.evaluation.scoring import LanguageModel
    from jetnas.evaluation.tasks import parse_task

    spec = "retrieval:kv@128?n=3&seed=1"
    config = StageConfig(stage=1, teacher=str(workspace / "teacher"), layer_types="attn,gdn,gdn,swa", swa_window=8,
                         data=str(workspace / "train.txt"), steps=4, batch_size=2, seq_len=32, heldout_tokens=256,
                         eval_every=2, eval_tasks=spec, eval_batch_size=2, out_dir=str(tmp_path / "s1"), device="cpu")
    result = train_stage(config)
    rows = [json.loads(line) for line in (tmp_path / "s1" / "log.jsonl").read_text().splitlines()]
    scored = [r for r in rows if f"eval/task/{spec}/acc" in r]
    assert [r["step"] for r in scored] == [2, 4]
    assert {f"task/{spec}/acc", f"task/{spec}/target_nll", "heldout/kl"} <= set(result.summary["eval"])
    model = AutoModelForCausalLM.from_pretrained(result.model_dir).eval()
    again = parse_task(spec).evaluate(LanguageModel.from_hf(model, AutoTokenizer.from_pretrained(result.model_dir)))
    # the same weights, rows and scorer (batch sizes differ: only padding and summation order could move the NLL)
    assert result.summary["eval"][f"task/{spec}/acc"] == again["acc"]
    assert abs(result.summary["eval"][f"task/{spec}/target_nll"] - again["target_nll"]) < 1e-4
    with pytest.raises(ValueError, match="retrieval needs KIND@LENGTH"):
        StageConfig(stage=1, layer_types="attn", eval_tasks="retrieval:kv")
    with pytest.raises(ValueError, match="are not built-in tasks"):
        StageConfig(stage=1, layer_types="attn", eval_tasks="arc_easy")
