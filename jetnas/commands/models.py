"""`jetnas convert` and `jetnas generate`."""

from __future__ import annotations


def convert(teacher: str, layer_types: str, out: str, block_config: str | None = None, freeze: bool = True,
            inherit: bool = True) -> dict:
    """Convert a pretrained model into a hybrid and save it (safetensors) with its tokenizer (its linear layers are
    untrained until `jetnas train --stage 1 --model OUT`).

    Args:
        teacher: smollm2-135m, a model directory, a .gguf file, or a hub id.
        layer_types: one block per layer, comma-separated (attn, swa, jet, gdn, deltanet, gla, retnet, mamba2;
            `jet*14` repeats; JetBlock variants and TYPE:KEY=VALUE options as in `jetnas train`), or a preset name
            (jet-nemotron-2b, jet-nemotron-4b). `swa` layers without a window in --block-config get the
            teacher's own sliding window, else 512 tokens (at most half its positions).
        out: output directory (written atomically: a partial directory is renamed when complete).
        block_config: JSON of per-block-type arguments, e.g. '{"swa": {"window_size": 1024}, "jet": {"expand_v": 1}}'.
        freeze: mark embeddings, norms, MLPs and the LM head requires_grad=False (PostNAS keeps them fixed).
        inherit: let linear blocks inherit Q/K/V/O from the attention they replace where shapes allow.
    """
    from jetnas.runner.models import check_model_path, convert_to_dir

    check_model_path(teacher, "--teacher")
    return convert_to_dir(teacher, layer_types, out, block_config, freeze, inherit)


def generate(model: str, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float | None = None,
             top_k: int | None = None, seed: int = 0, chat: bool = False, tokenizer: str | None = None,
             device: str | None = None, dtype: str = "auto") -> dict:
    """Generate text from a prompt, streaming it to the terminal (greedy unless --temperature > 0).

    Args:
        model: a model directory (ours or any HF causal LM), a preset (random weights), or a teacher name.
        prompt: the text to continue.
        max_new_tokens: tokens to generate.
        temperature: 0 for greedy decoding; > 0 samples.
        top_p: nucleus sampling threshold (with --temperature > 0).
        top_k: top-k sampling (with --temperature > 0).
        seed: random seed (sampling, random preset weights).
        chat: wrap the prompt in the tokenizer's chat template as a user turn.
        tokenizer: a tokenizer directory, hub id or teacher name: for a model directory without a tokenizer or a
            preset (jetnas never gives a model another model's vocabulary unasked).
        device: cpu, cuda, ...; default cuda when available.
        dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16.
    """
    from jetnas.runner.models import check_model_path, generate_text

    check_model_path(model)
    if tokenizer:
        check_model_path(tokenizer, "--tokenizer")
    return generate_text(model, prompt, max_new_tokens, temperature, top_p, top_k, seed, chat, tokenizer, device,
                         dtype)
