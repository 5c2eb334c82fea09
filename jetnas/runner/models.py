"""Models as the commands and stages load them: devices and dtypes by name, a model and its tokenizer from a
directory, a preset or a teacher name; converting a teacher into a hybrid directory; generating text."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def resolve_device(name: str | None) -> str:
    """`name`, or cuda when available, else cpu."""
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(name: str, device: str):
    """The torch dtype called `name`; auto: bfloat16 on a GPU, float32 elsewhere."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in DTYPE_NAMES:
        raise ValueError(f"--dtype must be auto or one of {', '.join(DTYPE_NAMES)}, got {name!r}")
    return getattr(torch, name)


def load_model_and_tokenizer(model: str, tokenizer: str | None, device: str, dtype, seed: int = 0):
    """A model for inference from a directory, a preset (random weights) or a teacher name; and its tokenizer."""
    import torch
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


def convert_to_dir(teacher: str, layer_types: str, out: str, block_config: str | None = None, freeze: bool = True,
                   inherit: bool = True) -> dict:
    """Convert a teacher into a hybrid with `layer_types` (the grammar of `jetnas.models.layer_types`) and save it
    with its tokenizer and `jetnas_conversion.json` into the new directory `out`, atomically. Returns the summary
    `jetnas convert` prints."""
    from jetnas.files import atomic_dir, write_json_atomic
    from jetnas.models.convert import convert_model
    from jetnas.models.layer_types import merge_block_configs, resolve_layer_types
    from jetnas.models.teachers import load_teacher

    try:
        extra = json.loads(block_config) if block_config else None
    except json.JSONDecodeError as err:
        raise ValueError(f"--block-config is not valid JSON ({err}): {block_config!r}") from err
    target = Path(out)
    if target.exists() and any(target.iterdir()):
        raise ValueError(f"--out {out!r} exists and is not empty; choose a new directory")
    model, tokenizer, spec = load_teacher(teacher)
    types, implied = resolve_layer_types(layer_types, model.config.num_hidden_layers)
    hybrid, report = convert_model(model, types, merge_block_configs(implied, extra) or None, freeze=freeze,
                                   inherit_linear=inherit)
    with atomic_dir(target) as partial:
        hybrid.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        write_json_atomic(partial / "jetnas_conversion.json", {
            "teacher": spec.name, "block_types": types,
            "inherited": {str(i): names for i, names in report.inherited.items()},
            "frozen": report.frozen,
        })
    counts = {t: types.count(t) for t in dict.fromkeys(types)}
    print(report.summary(), file=sys.stderr)
    return {
        "out": str(target), "teacher": spec.name, "layers": counts,
        "parameters": sum(p.numel() for p in hybrid.parameters()),
        "trainable_parameters": sum(p.numel() for p in hybrid.parameters() if p.requires_grad),
        "cache_bytes_per_sequence": {str(n): hybrid.cache_bytes(n) for n in (4096, 65536)},
    }


def generate_text(model: str, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
                  top_p: float | None = None, top_k: int | None = None, seed: int = 0, chat: bool = False,
                  tokenizer: str | None = None, device: str | None = None, dtype: str = "auto") -> dict:
    """Generate from `prompt` with `generate()`, streaming the text to stdout; returns the summary `jetnas generate`
    prints (prompt and new token counts, time, tokens/s, the new text)."""
    import torch
    from transformers import TextStreamer

    if temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {temperature}")
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    dev = resolve_device(device)
    net, tok = load_model_and_tokenizer(model, tokenizer, dev, resolve_dtype(dtype, dev), seed)
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
