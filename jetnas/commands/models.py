"""`jetnas convert` and `jetnas generate`."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise ValueError(f"--dtype must be auto or one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _device(name: str | None) -> str:
    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def convert(teacher: str, layer_types: str, out: str, block_config: str | None = None, freeze: bool = True,
            inherit: bool = True) -> dict:
    """Convert a pretrained model into a hybrid and save it (safetensors) with its tokenizer.

    Args:
        teacher: smollm2-135m, a model directory, a .gguf file, or a hub id.
        layer_types: one block per layer, comma-separated (attn, swa, jet, gdn, deltanet, gla, retnet, mamba2;
            `jet*14` repeats), or a preset name (jet-nemotron-2b, jet-nemotron-4b).
        out: output directory (written atomically: a partial directory is renamed when complete).
        block_config: JSON of per-block-type arguments, e.g. '{"swa": {"window_size": 1024}, "jet": {"expand_v": 1}}'.
        freeze: mark embeddings, norms, MLPs and the LM head requires_grad=False (PostNAS keeps them fixed).
        inherit: let linear blocks inherit Q/K/V/O from the attention they replace where shapes allow.
    """
    from jetnas.models.convert import convert_model, parse_layer_types
    from jetnas.models.teachers import load_teacher

    try:
        extra = json.loads(block_config) if block_config else None
    except json.JSONDecodeError as err:
        raise ValueError(f"--block-config is not valid JSON ({err}): {block_config!r}") from err
    target = Path(out)
    if target.exists() and any(target.iterdir()):
        raise ValueError(f"--out {out!r} exists and is not empty; choose a new directory")
    model, tokenizer, spec = load_teacher(teacher)
    types = parse_layer_types(layer_types, model.config.num_hidden_layers)
    hybrid, report = convert_model(model, types, extra, freeze=freeze, inherit_linear=inherit)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    hybrid.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / "jetnas_conversion.json").write_text(json.dumps({
        "teacher": spec.name, "block_types": types,
        "inherited": {str(i): names for i, names in report.inherited.items()},
        "frozen": report.frozen,
    }, indent=2))
    if target.exists():
        target.rmdir()
    partial.replace(target)
    counts = {t: types.count(t) for t in dict.fromkeys(types)}
    print(report.summary(), file=sys.stderr)
    return {
        "out": str(target), "teacher": spec.name, "layers": counts,
        "parameters": sum(p.numel() for p in hybrid.parameters()),
        "trainable_parameters": sum(p.numel() for p in hybrid.parameters() if p.requires_grad),
        "cache_bytes_per_sequence": {str(n): hybrid.cache_bytes(n) for n in (4096, 65536)},
    }


def load_model_and_tokenizer(model: str, tokenizer: str | None, device: str, dtype: torch.dtype, seed: int = 0):
    """A model for inference from a directory, a preset (random weights) or a teacher name; and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jetnas.models.presets import PRESETS, preset_config
    from jetnas.models.teachers import load_teacher

    path = Path(model).expanduser()
    if path.is_dir() and (path / "config.json").exists():
        net = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        tok = AutoTokenizer.from_pretrained(tokenizer or path) if tokenizer or (path / "tokenizer.json").exists() \
            else load_teacher("smollm2-135m")[1]
        return net, tok
    if model in PRESETS:
        from jetnas.models.modeling import JetNemotronForCausalLM

        print(f"jetnas: {model} with random weights (an architecture preset, not a trained model)", file=sys.stderr)
        torch.manual_seed(seed)
        with torch.device(device):
            net = JetNemotronForCausalLM(preset_config(model)).to(dtype).eval()
        tok = load_teacher(tokenizer or "smollm2-135m")[1]
        return net, tok
    net, tok, _ = load_teacher(model, dtype=dtype, device=device)
    if tokenizer:
        tok = AutoTokenizer.from_pretrained(tokenizer)
    return net, tok


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
        tokenizer: tokenizer directory or teacher name, when the model has none.
        device: cpu, cuda, ...; default cuda when available.
        dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16.
    """
    from transformers import TextStreamer

    if temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {temperature}")
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    dev = _device(device)
    net, tok = load_model_and_tokenizer(model, tokenizer, dev, _dtype(dtype, dev), seed)
    if chat:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(prompt, return_tensors="pt").input_ids
    ids = ids.to(dev)
    torch.manual_seed(seed)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k) if temperature > 0 \
        else dict(do_sample=False)
    streamer = TextStreamer(tok, skip_prompt=False)
    start = time.perf_counter()
    out = net.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, streamer=streamer,
                       pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0, **sampling)
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    new = out[0, ids.shape[1]:]
    print(flush=True)
    return {"model": model, "prompt_tokens": ids.shape[1], "new_tokens": int(new.numel()),
            "seconds": round(elapsed, 3), "tokens_per_s": round(new.numel() / elapsed, 2),
            "text": tok.decode(new, skip_special_tokens=True)}
