"""Models as the commands and stages load them: devices and dtypes by name, a model and its tokenizer from a
directory, a preset or a teacher name; converting a teacher into a hybrid directory; generating text."""

from __future__ import annotations

import json
import re
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


#: files whose presence says a directory holds a tokenizer (transformers' fast, slow and SentencePiece formats)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def has_tokenizer(path: str | Path) -> bool:
    """Whether the directory `path` holds a tokenizer (one of `TOKENIZER_FILES`)."""
    return any((Path(path) / name).exists() for name in TOKENIZER_FILES)


def _written_as_path(spec: str) -> bool:
    """`spec` can only be a path: it starts with . / ~, ends in .gguf, or has more than one / (a hub id is
    ORG/NAME; presets and teacher names have none)."""
    return spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1


def check_model_path(model: str, flag: str = "--model") -> None:
    """Refuse, without importing torch, a `model` written as a path that does not exist, or a directory without a
    config.json (for `--tokenizer`: without a tokenizer): the error a user sees first, in under a second, instead of
    after seconds of imports."""
    path = Path(model).expanduser()
    if not path.exists() and _written_as_path(model):
        raise FileNotFoundError(f"{flag} {model!r} does not exist")
    if not path.is_dir():
        return
    if flag == "--tokenizer" and not has_tokenizer(path):
        raise FileNotFoundError(f"--tokenizer {model!r} holds no tokenizer ({' / '.join(TOKENIZER_FILES)})")
    if flag != "--tokenizer" and not (path / "config.json").exists():
        raise FileNotFoundError(f"{flag} {model!r} is a directory without a config.json: not a model directory")


def network_notice(spec: str, what: str = "model") -> None:
    """Say, before it starts, that loading `spec` may need the network: a name that is no local path, no preset and
    no built-in teacher is a Hugging Face hub id."""
    if Path(spec).expanduser().exists() or "/" not in spec or _written_as_path(spec):
        return
    print(f"jetnas: {what} {spec!r} is not a local path: loading it as a Hugging Face hub id (needs the network "
          f"unless it is in the Hugging Face cache)", file=sys.stderr)



def check_teacher(teacher: str) -> None:
    """What every command that loads a teacher checks first, before torch is imported: the path exists
    (`check_model_path`), and a hub id is announced as needing the network (`network_notice`)."""
    check_model_path(teacher, "--teacher")
    network_notice(teacher, "teacher")

def load_model(model: str, device: str, dtype, seed: int = 0):
    """A model for inference (eval mode) from a directory, a preset (random weights) or a teacher name (a name,
    .gguf file or hub id). No tokenizer is loaded beyond a teacher's own: what needs none (`jetnas bench`) neither
    loads one nor needs the network for one."""
    return _load(model, device, dtype, seed)[0]


def _load(model: str, device: str, dtype, seed: int):
    """`(model, its own tokenizer or None)`; a teacher comes with its tokenizer, a directory or preset without."""
    import torch
    from transformers import AutoModelForCausalLM

    from jetnas.models.presets import PRESETS, preset_config
    from jetnas.models.teachers import TEACHER_NAMES, load_teacher

    check_model_path(model)
    path = Path(model).expanduser()
    if path.is_dir():
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval(), None
    if model in PRESETS:
        from jetnas.models.modeling import JetNemotronForCausalLM

        print(f"jetnas: {model} with random weights (an architecture preset, not a trained model)", file=sys.stderr)
        torch.manual_seed(seed)
        with torch.device(device):
            return JetNemotronForCausalLM(preset_config(model)).to(dtype).eval(), None
    if "/" not in model and model not in TEACHER_NAMES:
        import difflib

        known = [*PRESETS, TEACHER_NAMES[0]]
        close = difflib.get_close_matches(model, known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"--model {model!r} is no model directory, preset or teacher name; {hint}known names: "
                         f"{', '.join(known)} (or a directory, a .gguf file, a hub id ORG/NAME)")
    network_notice(model)
    net, tok, _ = load_teacher(model, dtype=dtype, device=device)
    return net, tok


#: how to give `jetnas generate` a tokenizer
PASS_A_TOKENIZER = "pass --tokenizer (a directory holding one, a hub id, or a teacher name) with that vocabulary"


def tokenizer_source(model: str, tokenizer: str | None, how: str = PASS_A_TOKENIZER) -> str | None:
    """Where the tokenizer of `model` comes from, decided before any weights load: `tokenizer` when given, the model
    directory when it holds one, None for a teacher (its own comes with it). A directory without one, or a preset
    (random weights, no vocabulary of its own), is refused with `how` to give one: jetnas never hands a model
    another model's vocabulary unasked."""
    from jetnas.models.presets import PRESETS

    if tokenizer:
        check_model_path(tokenizer, "--tokenizer")
        return tokenizer
    path = Path(model).expanduser()
    if path.is_dir():
        if has_tokenizer(path):
            return str(path)
        config = read_json_quietly(path / "config.json")
        vocab = f" (its vocabulary: {config['vocab_size']:,} ids)" if isinstance(config.get("vocab_size"), int) else ""
        raise ValueError(f"model directory {model!r} has no tokenizer ({' / '.join(TOKENIZER_FILES[:2])}) and jetnas "
                         f"will not guess one{vocab}: {how}")
    if model in PRESETS:
        raise ValueError(f"preset {model!r} has random weights and no tokenizer (its vocabulary: "
                         f"{PRESETS[model]['vocab_size']:,} ids): {how}")
    return None


def read_json_quietly(path: Path) -> dict:
    """A JSON object from `path`, or {} when it is missing or not one (for hints in error messages only)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def load_tokenizer(spec: str):
    """A tokenizer from a directory holding one, a teacher name or .gguf file (its tokenizer only, never its
    weights: `jetnas.models.teachers.teacher_files`), or a hub id."""
    from transformers import AutoTokenizer

    from jetnas.models.teachers import teacher_files

    path = Path(spec).expanduser()
    if path.is_dir():
        check_model_path(spec, "--tokenizer")
        return AutoTokenizer.from_pretrained(path)
    network_notice(spec, "tokenizer")
    source, kwargs = teacher_files(spec)
    return AutoTokenizer.from_pretrained(source, **kwargs)


def check_vocabulary(net, tok, model: str, tokenizer: str | None) -> None:
    """Refuse a tokenizer whose ids the model cannot embed (another model's vocabulary)."""
    embeddings = net.get_input_embeddings() if hasattr(net, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None) or getattr(net.config, "vocab_size", None)
    if vocab is not None and len(tok) > vocab:
        raise ValueError(f"tokenizer {tokenizer or model!r} has {len(tok):,} tokens but {model!r} embeds only "
                         f"{vocab:,}: it is another model's vocabulary")


def load_model_and_tokenizer(model: str, tokenizer: str | None, device: str, dtype, seed: int = 0,
                             how: str = PASS_A_TOKENIZER):
    """A model for inference (see `load_model`) and its tokenizer: `tokenizer` when given, the directory's own, or a
    teacher's own; anything else is refused before the weights load (`tokenizer_source`, with `how` to give one)."""
    source = tokenizer_source(model, tokenizer, how)
    net, own = _load(model, device, dtype, seed)
    tok = own if source is None else load_tokenizer(source)
    check_vocabulary(net, tok, model, tokenizer)
    return net, tok


def untrained_hint(model: str) -> str | None:
    """A one-line hint when `model` is a directory `jetnas convert` wrote and no training stage has written since
    (it holds `jetnas_conversion.json` and no `jetnas_stage.json`, which a training stage writes with its model)
    and it has linear layers: they are inherited where shapes allowed and fresh otherwise, so the model cannot
    produce sensible text yet. None otherwise."""
    path = Path(model).expanduser()
    conversion = read_json_quietly(path / "jetnas_conversion.json") if path.is_dir() else {}
    if not conversion or (path / "jetnas_stage.json").exists():
        return None
    linear = [t for t in conversion.get("block_types", []) if t not in ("attn", "swa")]
    if not linear:
        return None
    kinds = ", ".join(dict.fromkeys(linear))
    teacher = conversion.get("teacher_source") or conversion.get("teacher") or "TEACHER"
    return (f"jetnas: hint: the {len(linear)} linear layers ({kinds}) of {model} are untrained (converted, not trained "
            f"since), so its text is noise until they are: jetnas train --stage 1 --model {model} --teacher {teacher} "
            f"--out-dir runs/stage1")


def teacher_config(teacher: str):
    """The config of `teacher` alone, its weights not loaded (a local config.json is validated first, so a bad one
    fails naming its field): what arguments are checked against before a conversion loads the weights."""
    from transformers import AutoConfig

    from jetnas.models.teachers import teacher_files
    from jetnas.validation import read_model_config

    path = Path(teacher).expanduser()
    if path.is_dir():
        read_model_config(path)
    network_notice(teacher, "teacher")
    source, kwargs = teacher_files(teacher)
    return AutoConfig.from_pretrained(source, **kwargs)


def _layers_in_weights(path: Path) -> int | None:
    """How many decoder layers the safetensors files of a model directory hold (the largest `layers.N.` index + 1),
    read from the files' headers alone; None without safetensors files."""
    from safetensors import safe_open

    found = None
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():
                m = re.search(r"(?:^|\.)layers\.(\d+)\.", key)
                if m:
                    found = max(found or 0, int(m.group(1)) + 1)
    return found


def check_layer_types(teacher: str, layer_types: str, extra: dict | None = None) -> tuple[list[str], dict] | None:
    """`layer_types` resolved against the teacher's layer count read from its config (`teacher_config`): a wrong
    count or a bad entry fails in seconds, before the teacher's weights load. Returns `(types, block options)` as
    `jetnas.models.layer_types.resolve_layer_types`, `extra` merged in; None when a local teacher's config declares
    another layer count than its weights hold: that is the config's error, which loading it reports by name."""
    config = teacher_config(teacher)
    try:
        return resolve_with(config.num_hidden_layers, layer_types, extra)
    except ValueError:
        path = Path(teacher).expanduser()
        if path.is_dir() and _layers_in_weights(path) not in (None, config.num_hidden_layers):
            return None
        raise


def resolve_with(num_layers: int, layer_types: str, extra: dict | None) -> tuple[list[str], dict]:
    """`layer_types` for `num_layers` layers with `extra` block options merged in (`resolve_layer_types`)."""
    from jetnas.models.layer_types import merge_block_configs, resolve_layer_types

    types, implied = resolve_layer_types(layer_types, num_layers)
    return types, merge_block_configs(implied, extra)


def convert_to_dir(teacher: str, layer_types: str, out: str, block_config: str | None = None, freeze: bool = True,
                   inherit: bool = True) -> dict:
    """Convert a teacher into a hybrid with `layer_types` (the grammar of `jetnas.models.layer_types`) and save it
    with its tokenizer and `jetnas_conversion.json` into the new directory `out`, atomically. Every argument is
    checked before the teacher's weights load (its layer count from its config alone). `swa` layers without a
    window get `jetnas.models.convert.default_swa_window`'s, said on stderr; a hybrid with linear layers gets a
    hint on stderr that they are untrained. Returns the summary `jetnas convert` prints."""
    from jetnas.files import atomic_dir, write_json_atomic
    from jetnas.models.convert import convert_model, default_swa_window
    from jetnas.models.teachers import load_teacher

    try:
        extra = json.loads(block_config) if block_config else None
    except json.JSONDecodeError as err:
        raise ValueError(f"--block-config is not valid JSON ({err}): {block_config!r}") from err
    target = Path(out)
    if target.exists() and any(target.iterdir()):
        raise ValueError(f"--out {out!r} exists and is not empty; choose a new directory")
    checked = check_layer_types(teacher, layer_types, extra)
    model, tokenizer, spec = load_teacher(teacher)
    types, options = checked or resolve_with(model.config.num_hidden_layers, layer_types, extra)
    hybrid, report = convert_model(model, types, options or None, freeze=freeze, inherit_linear=inherit)
    window = hybrid.config.efficient_attention_config.get("swa", {}).get("window_size") if "swa" in types else None
    if window is not None and "swa" not in options:
        why = default_swa_window(model.config)[1]
        print(f"jetnas: swa layers get a window of {window} tokens ({why}); another with --block-config "
              f"'{{\"swa\": {{\"window_size\": W}}}}'", file=sys.stderr)
    with atomic_dir(target) as partial:
        hybrid.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        write_json_atomic(partial / "jetnas_conversion.json", {
            "teacher": spec.name, "teacher_source": teacher, "block_types": types, "swa_window": window,
            "inherited": {str(i): names for i, names in report.inherited.items()},
            "frozen": report.frozen,
        })
    counts = {t: types.count(t) for t in dict.fromkeys(types)}
    print(report.summary(), file=sys.stderr)
    hint = untrained_hint(str(target))
    if hint:
        print(hint, file=sys.stderr)
    return {
        "out": str(target), "teacher": spec.name, "layers": counts, "swa_window": window,
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
    hint = untrained_hint(model)
    if hint:
        print(hint, file=sys.stderr)
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
