"""The super-network: its all-attention sub-network is the teacher, only linear paths train, and distillation
lowers the feature loss."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from jetnas.models.convert import convert_model
from jetnas.nas.distill import DistillConfig, make_distill_loss
from jetnas.nas.sampling import Budget, SubnetSampler
from jetnas.nas.supernet import SuperNet, SuperNetSpec
from jetnas.train.losses import distill_terms

L = 4


def tiny_teacher():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=L,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def make_supernet(linear_type="gla", swa_window=4, teacher=None):
    teacher = teacher or tiny_teacher()
    base, _ = convert_model(teacher, ["attn"] * L)
    return SuperNet(base, SuperNetSpec("tiny", linear_type, swa_window=swa_window)), teacher


def test_all_attention_subnetwork_is_the_teacher():
    supernet, teacher = make_supernet()
    ids = torch.randint(0, 128, (2, 17))
    with torch.no_grad():
        logits, hidden = supernet(ids, supernet.teacher_choice(), output_hidden_states=True)
        ref = teacher(ids, output_hidden_states=True)
    assert torch.equal(logits, ref.logits)
    assert len(hidden) == L and torch.equal(hidden[1], ref.hidden_states[2])


def test_swa_choice_is_windowed_attention_with_the_same_weights():
    supernet, _ = make_supernet(swa_window=4)
    short, long_ = torch.randint(0, 128, (1, 4)), torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        # within the window sliding-window attention is full attention
        assert torch.equal(supernet(short, ("swa",) * L)[0], supernet(short, ("attn",) * L)[0])
        assert not torch.allclose(supernet(long_, ("swa",) * L)[0], supernet(long_, ("attn",) * L)[0])


@pytest.mark.parametrize("linear_type", ["gla", "jet", "gdn", "mamba2", "retnet", "deltanet"])
def test_any_zoo_block_as_linear_path_only_it_trains(linear_type):
    supernet, _ = make_supernet(linear_type)
    trainable = {n for n, p in supernet.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("linear.") for n in trainable)
    assert all(supernet.inherited), "the linear paths inherit from the attention they sit beside"
    ids = torch.randint(0, 128, (2, 9))
    logits, _ = supernet(ids, ("linear", "attn", "swa", "linear"))
    logits.float().square().mean().backward()
    first = [p for p in supernet.linear[0].parameters() if p.grad is not None]
    assert first and all(p.grad is None for p in supernet.linear[1].parameters())


def test_bad_choices_are_refused():
    supernet, _ = make_supernet()
    with pytest.raises(ValueError, match="one of"):
        supernet(torch.randint(0, 128, (1, 3)), ("attn", "mlp", "attn", "attn"))
    with pytest.raises(ValueError, match="linear_type must be one of"):
        SuperNetSpec("tiny", "lstm")


def test_distillation_lowers_the_feature_loss():
    supernet, _ = make_supernet("gla")
    sampler = SubnetSampler(L, mode="budget", budget=Budget(attn=1), seed=0)
    loss_fn = make_distill_loss(sampler, DistillConfig(kl_weight=0.1, subnets_per_step=2))
    params = [p for p in supernet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    torch.manual_seed(1)
    batch = {"input_ids": torch.randint(0, 128, (4, 33))}
    fixed = ("linear", "attn", "linear", "linear")
    with torch.no_grad():
        _, t_hidden = supernet(batch["input_ids"][:, :-1], supernet.teacher_choice(), output_hidden_states=True)

    def probe():
        with torch.no_grad():
            _, s_hidden = supernet(batch["input_ids"][:, :-1], fixed, output_hidden_states=True)
        return distill_terms(s_hidden, t_hidden)["hidden"].item()

    before = probe()
    for step in range(60):
        loss, metrics = loss_fn(supernet, batch, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = probe()
    print(f"relative feature MSE of {fixed}: {before:.4f} -> {after:.4f}")
    assert after < 0.5 * before
    assert set(metrics) == {"hidden", "kl", "linear_layers"} and metrics["linear_layers"] == L - 1


def test_save_writes_only_the_linear_paths(tmp_path):
    from safetensors.torch import load_file

    supernet, _ = make_supernet()
    supernet.save(tmp_path, extra={"note": "x"})
    state = load_file(str(tmp_path / "linear.safetensors"))
    assert set(state) == set(supernet.trainable_state_dict()) and all(k.startswith("linear.") for k in state)
    fresh, _ = make_supernet()
    fresh.linear.load_state_dict({k.removeprefix("linear."): v for k, v in state.items()})
    ids = torch.randint(0, 128, (1, 7))
    with torch.no_grad():
        assert torch.equal(fresh(ids, ("linear",) * L)[0], supernet(ids, ("linear",) * L)[0])


@pytest.mark.parametrize("linear_type", ["gdn", "gla"])
def test_fused_residual_adds_give_the_plain_adds_result(linear_type, monkeypatch):
    """`run_layers` adds each residual inside the norm after it (`RMSNorm.add_forward`): with the backend's
    `fused_residual` (Triton; its interpreter on CPU) the logits, every layer's state and the linear paths'
    gradients match the plain adds' (the same backend without the fusion), from layer 0 and from a later start,
    with and without logits. Float32: the kernel sums in another order and takes 1 / sqrt for rsqrt, ~1e-7 per
    norm (tests/ops/test_fused_residual.py); 1e-5 over 4 layers leaves a margin while a dropped or doubled residual
    term shows at 1e-1."""
    from jetnas.modules.backend import set_backend
    from jetnas.ops.backend import Backend
    from tests.utils import rel_err

    import jetnas.ops.triton_fused as tf

    calls = []
    kernel = tf.triton_add_rms_norm
    monkeypatch.setattr(tf, "triton_add_rms_norm", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    plain, fused = (Backend("triton", interpret=True, fused_residual=f) for f in (False, True))
    ids = torch.randint(0, 128, (2, 11))
    choice = ("linear", "attn", "swa", "linear")
    results = []
    for backend in (plain, fused):
        supernet, _ = make_supernet(linear_type)
        set_backend(supernet, backend)
        logits, states = supernet.run_layers(ids, choice)
        later, later_states = supernet.run_layers(ids, choice, start=2, hidden=states[2].detach())
        _, no_logits = supernet.run_layers(ids, choice, logits=False)
        (logits.square().mean() + later.square().mean()).backward()
        grads = [p.grad.clone() for p in supernet.linear.parameters() if p.grad is not None]
        results.append((logits, states, later, later_states, no_logits, grads))
        # the fused run's adds went through the kernel (2 per layer: 8 + 4 from layer 2 + 7 without logits)
        assert len(calls) == (19 if backend is fused else 0)
    for got, ref in zip(*results):
        got, ref = (got, ref) if isinstance(got, list) else ([got], [ref])
        assert len(got) == len(ref) and len(got) > 0
        for g, r in zip(got, ref):
            assert rel_err(g, r) < 1e-5


def test_autocast_runs_a_copy_with_cast_linear_weights_bit_for_bit():
    """Under bf16 autocast the super-network's forward runs `forward_base()`: a copy of the frozen base with its
    Linear weights cast once (`autocast_copy`), made at the first such forward and kept; logits, states and the
    linear paths' gradients equal those of the base cast by autocast at every call (`cast_frozen` off), bit for bit
    (the same rounding of the same weights). Outside autocast, and with it off, the base itself runs."""
    supernet, _ = make_supernet("gdn")
    ids = torch.randint(0, 128, (2, 11))
    choice = ("linear", "attn", "swa", "linear")
    assert supernet.forward_base() is supernet.base
    results = []
    for cast in (False, True):
        supernet.cast_frozen = cast
        supernet.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            base = supernet.forward_base()
            assert (base is supernet.base) != cast
            logits, states = supernet.run_layers(ids, choice)
            assert supernet.forward_base() is base  # kept, not remade
        logits.float().square().mean().backward()
        results.append((logits, states, [p.grad.clone() for p in supernet.linear.parameters() if p.grad is not None]))
    copy = supernet.__dict__["_cast_base"][1]
    assert copy.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert copy.model.embed_tokens.weight is supernet.base.model.embed_tokens.weight  # shared, not copied
    assert not any(n.startswith("_cast_base") for n, _ in supernet.named_parameters())
    (l0, s0, g0), (l1, s1, g1) = results
    assert torch.equal(l0, l1) and all(torch.equal(a, b) for a, b in zip(s0, s1))
    assert g0 and all(torch.equal(a, b) for a, b in zip(g0, g1))
