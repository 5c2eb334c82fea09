"""Helpers shared by the tests."""

import os

import pytest
import torch

#: where the kernel tests run: the GPU when there is one, else CPU tensors under Triton's interpreter (which
#: tests/conftest.py switches on before anything imports triton)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: a test of our Triton kernels: runs on CUDA, or on CPU under the interpreter
needs_triton = pytest.mark.skipif(
    DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1", reason="no CUDA and TRITON_INTERPRET is not 1")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, the error measure every comparison in this suite uses."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


ALL_TYPES = ["attn", "swa", "jet", "gdn", "deltanet", "gla", "retnet", "mamba2", "rwkv7"]


def tiny_config(block_types=None, **overrides):
    """A small JetNemotronConfig (one layer per block type by default)."""
    from jetnas.models import JetNemotronConfig

    block_types = block_types or ALL_TYPES
    fields = dict(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=len(block_types),
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, block_types=block_types,
        efficient_attention_config={
            "swa": {"window_size": 5},
            "jet": {"num_heads": 2, "head_dim": 8, "expand_v": 2.0},
            "mamba2": {"num_heads": 4, "head_dim": 8, "state_size": 8},
            "rwkv7": {"num_heads": 2, "head_k_dim": 8, "head_v_dim": 16, "decay_low_rank_dim": 8, "a_low_rank_dim": 8,
                      "gate_low_rank_dim": 8},
        },
    )
    fields.update(overrides)
    return JetNemotronConfig(**fields)


def randomize_zero_init(model):
    """Give zero-initialised parts (the JetBlock generator's w2, conv biases) values so tests exercise them."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "kernel_generator.w2.weight" in name or name.endswith("conv1d.bias"):
                p.normal_(std=0.05)
    return model


_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Question: what is the capital of France? Answer: Paris. "
    "The special code for Lisbon is 4821. A farmer walked along the stone wall before the sun went down. "
    "0123456789 ABCD. Multiple choice questions about astronomy, biology, history and geography follow. "
)


def tiny_tokenizer():
    """A real byte-level BPE tokenizer (transformers fast tokenizer) trained in memory, ~300 tokens: tests get a
    tokenizer without downloading one."""
    global _TOKENIZER
    if _TOKENIZER is None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      special_tokens=["<eos>"], show_progress=False)
        tok.train_from_iterator([_CORPUS] * 4, trainer)
        _TOKENIZER = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    return _TOKENIZER


_TOKENIZER = None


def tiny_lm(block_types=("attn", "jet"), seed: int = 0, **lm_kwargs):
    """A random tiny hybrid with the tiny tokenizer, wrapped for the evaluators."""
    from jetnas.evaluation.scoring import LanguageModel
    from jetnas.models import JetNemotronForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    model = JetNemotronForCausalLM(tiny_config(list(block_types), vocab_size=len(tok))).eval()
    return LanguageModel.from_hf(model, tok, **{"max_length": 512, "batch_size": 4, **lm_kwargs}), model


def save_tiny_llama(target, num_layers: int = 4, seed: int = 0):
    """A tiny Llama teacher with the tiny tokenizer, saved as a model directory at `target` (what `jetnas train
    --teacher DIR` and the stages load); returns `target`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(target)
    tok.save_pretrained(target)
    return target


def record_gradients(trainer, model) -> list[dict]:
    """The gradients each optimizer step of `trainer` applies (the optimizer still steps)."""
    seen = []
    step = trainer.optimizer.step

    def recording():
        seen.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        return step()

    trainer.optimizer.step = recording
    return seen
