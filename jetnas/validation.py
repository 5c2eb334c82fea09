"""One validation layer for what users hand jetnas: model `config.json` files, data files (`.bin`, `.jsonl`), task
files, JSON records of runs, and `--block-config` values.

Every check raises `InputError`, a `ValueError` (the CLI prints it as one line, `jetnas: error: ...`) whose message
names the file (or flag), the field and the value, e.g. `runs/x/config.json: num_key_value_heads=0: must be an
integer >= 1`. Nothing here loads a model: these checks run before anything slow, so a bad input fails in a second,
not after the teacher has loaded.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np


class InputError(ValueError):
    """A bad input: the message names the file or flag, the field and the value."""


def show(value: Any, limit: int = 60) -> str:
    """`repr(value)`, cut to `limit` characters (a garbled field can be a megabyte long)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------------------------
# scalar fields


def check_int(value: Any, field: str, where: str, minimum: int | None = 1, allow_none: bool = False) -> int | None:
    """`value` as an int (not a bool, not a float, not a string) >= `minimum`; `where` names the file or flag."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{where}: {field}={show(value)}: must be an integer"
                         + (f" >= {minimum}" if minimum is not None else ""))
    if minimum is not None and value < minimum:
        raise InputError(f"{where}: {field}={show(value)}: must be an integer >= {minimum}")
    return int(value)


def check_number(value: Any, field: str, where: str, minimum: float | None = None, inclusive: bool = False,
                 maximum: float | None = None, allow_none: bool = False) -> float | None:
    """`value` as a finite float (an int is fine, a bool or string is not), above `minimum` (or equal if
    `inclusive`) and at most `maximum`."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InputError(f"{where}: {field}={show(value)}: must be a number")
    if not np.isfinite(value):
        raise InputError(f"{where}: {field}={show(value)}: must be a finite number")
    if minimum is not None and (value < minimum or (value == minimum and not inclusive)):
        raise InputError(f"{where}: {field}={show(value)}: must be {'>=' if inclusive else '>'} {minimum}")
    if maximum is not None and value > maximum:
        raise InputError(f"{where}: {field}={show(value)}: must be <= {maximum}")
    return float(value)


def check_bool(value: Any, field: str, where: str) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"{where}: {field}={show(value)}: must be true or false")
    return value


def check_str(value: Any, field: str, where: str, choices: tuple[str, ...] | None = None) -> str:
    if not isinstance(value, str):
        raise InputError(f"{where}: {field}={show(value)}: must be a string")
    if choices is not None and value not in choices:
        raise InputError(f"{where}: {field}={show(value)}: must be one of {', '.join(choices)}")
    return value


# ---------------------------------------------------------------------------------------------------------------
# JSON files


def parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{where}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None


def read_json(path: str | Path, kind: type | None = dict) -> Any:
    """The JSON value of the file `path` (a dict unless `kind` says otherwise; None: any value). A missing file is a
    `FileNotFoundError` naming it; unreadable or invalid JSON, or a value of another kind, an `InputError`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text (byte {err.start})") from None
    value = parse_json(text, str(path))
    if kind is not None and not isinstance(value, kind):
        raise InputError(f"{path}: expected a JSON {'object' if kind is dict else kind.__name__}, got "
                         f"{type(value).__name__} {show(value)}")
    return value


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """`(line number, row)` of each non-blank line of a `.jsonl` or `.jsonl.gz` file; every row must be a JSON
    object. Errors name the file and the line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    lineno = 0
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = parse_json(line, f"{path} line {lineno}")
                if not isinstance(row, dict):
                    raise InputError(f"{path} line {lineno}: expected a JSON object, got {show(row)}")
                yield lineno, row
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise InputError(f"{path}: damaged gzip file after line {lineno} ({err})") from None
    except UnicodeDecodeError as err:
        raise InputError(f"{path} line {lineno + 1}: not UTF-8 text (byte {err.start})") from None


# ---------------------------------------------------------------------------------------------------------------
# model config.json

#: sizes every transformers decoder config we read has (when present: each must be an integer >= 1)
_CONFIG_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "max_position_embeddings")
#: sizes that may be null (derived from the others)
_CONFIG_OPTIONAL_SIZES = ("num_key_value_heads", "head_dim", "sliding_window")
_CONFIG_POSITIVE = ("rms_norm_eps", "layer_norm_eps", "norm_eps")
_CONFIG_BOOLS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_cache")
_TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def check_model_config(config: Mapping, where: str) -> None:
    """The fields of a transformers decoder config (a `config.json`'s dict) that a wrong value would turn into a
    traceback deep in model construction, or into a silently wrong model: sizes, norms, flags, token ids."""
    if not isinstance(config, Mapping):
        raise InputError(f"{where}: expected a JSON object, got {show(config)}")
    for name in _CONFIG_SIZES:
        if name in config:
            check_int(config[name], name, where)
    for name in _CONFIG_OPTIONAL_SIZES:
        if name in config:
            check_int(config[name], name, where, allow_none=True)
    for name in _CONFIG_POSITIVE:
        if name in config:
            check_number(config[name], name, where, minimum=0.0)
    for name in _CONFIG_BOOLS:
        if name in config:
            check_bool(config[name], name, where)
    if "initializer_range" in config:
        check_number(config["initializer_range"], "initializer_range", where, minimum=0.0, inclusive=True)
    heads, kv = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if heads is not None and kv is not None and heads % kv:
        raise InputError(f"{where}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
    vocab = config.get("vocab_size")
    for name in _TOKEN_FIELDS:
        value = config.get(name)
        for token in value if isinstance(value, list) else [value]:
            if token is None:
                continue
            check_int(token, name, where, minimum=0)
            if vocab is not None and token >= vocab:
                raise InputError(f"{where}: {name}={show(value)}: beyond the vocabulary (vocab_size={vocab})")


def read_model_config(path: str | Path) -> dict:
    """A model directory's (or the file's own) `config.json`, parsed and checked by `check_model_config`."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    config = read_json(file)
    check_model_config(config, str(file))
    return config


# ---------------------------------------------------------------------------------------------------------------
# token files


def token_dtype(path: Path) -> np.dtype:
    """The id type of a token file: its sidecar `<file>.json` `{"dtype": ...}` (uint16 or uint32), else uint16."""
    sidecar = path.with_name(path.name + ".json")
    if not sidecar.exists():
        return np.dtype("<u2")
    meta = read_json(sidecar)
    try:
        dtype = np.dtype(meta.get("dtype", "<u2"))
    except TypeError:
        raise InputError(f"{sidecar}: dtype={show(meta.get('dtype'))}: not a numpy dtype") from None
    if dtype.kind != "u" or dtype.itemsize not in (2, 4):
        raise InputError(f"{sidecar}: dtype={show(meta.get('dtype'))}: token ids are uint16 or uint32")
    return dtype.newbyteorder("<")


def open_token_file(path: str | Path) -> np.memmap:
    """A token file (flat little-endian ids, see `jetnas.train.data`) as a read-only memory map, after checking that
    it is not empty, that its size is a whole number of ids, and, when its sidecar records a token count, that it
    holds exactly that many (a truncated copy fails here, not as a shorter corpus)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"token file {path} does not exist")
    dtype = token_dtype(path)
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"{path}: the token file is empty")
    if size % dtype.itemsize:
        raise InputError(f"{path}: {size} bytes is not a whole number of {dtype.itemsize}-byte token ids "
                         f"(truncated, or not a token file)")
    sidecar = path.with_name(path.name + ".json")
    expected = read_json(sidecar).get("tokens") if sidecar.exists() else None
    if expected is not None and size // dtype.itemsize != expected:
        raise InputError(f"{path}: holds {size // dtype.itemsize} token ids, its {sidecar.name} says {expected} "
                         f"(truncated?)")
    return np.memmap(path, dtype=dtype, mode="r")


def check_token_ids(array: np.ndarray, vocab_size: int, name: str, chunk: int = 1 << 24) -> None:
    """Raise `InputError` when an id of `array` is >= `vocab_size`, naming `name`, the first such position and value.
    Scans in chunks (a memory map is read once, never loaded whole): about 2 ms per 10M uint16 ids from the page
    cache on our CPU box."""
    for start in range(0, len(array), chunk):
        part = np.asarray(array[start : start + chunk])
        if part.size and int(part.max()) >= vocab_size:
            at = int(np.argmax(part >= vocab_size))
            raise InputError(f"{name}: token id {int(part[at])} at position {start + at} is outside the model's "
                             f"vocabulary of {vocab_size} (made with another tokenizer?)")


# ---------------------------------------------------------------------------------------------------------------
# efficient_attention_config / --block-config

# the released "jet" keys (the JetBlock's own argument names differ: head_dim -> head_k_dim, ...)
# (the released 2B config writes norm_eps as the string "1e-5": numbers may come as numeric strings there)
_JET_RULES = {"num_heads": "size", "head_dim": "size", "expand_v": "positive text", "conv_size": "size",
              "dconv_generator_reduction": "size", "norm_eps": "positive text", "mode": ("chunk", "fused_recurrent"),
              "dconv_implementation": "str", "qk_conv": ("none", "static", "dynamic"),
              "v_conv": ("none", "static", "dynamic"), "use_decay": "bool", "use_output_gate": "bool"}
#: `layer_windows`: `{layer index: window}` for `swa` layers whose window is not `window_size` (keys as JSON writes
#: them, strings, or ints)
_SWA_RULES = {"window_size": "size", "layer_windows": "layer sizes"}


def _rules_from_signature(cls) -> dict[str, Any]:
    """A block's options from its constructor: an int argument is a size (>= 1), a float a positive number, a bool a
    flag, a str a string (the block checks its choices)."""
    import inspect

    rules = {}
    for name, param in list(inspect.signature(cls.__init__).parameters.items())[2:]:  # self, hidden_size
        annotation = str(param.annotation)
        if "bool" in annotation:
            rules[name] = "bool"
        elif "int" in annotation:
            rules[name] = "size?" if "None" in annotation else "size"
        elif "float" in annotation:
            rules[name] = "positive"
        else:
            rules[name] = "str"
    return rules


def block_option_rules() -> dict[str, dict[str, Any]]:
    """Per block type, its option names and the rule of each value (see `check_block_config`)."""
    from jetnas.layers import LINEAR_LAYERS

    rules = {"swa": _SWA_RULES, "jet": _JET_RULES}
    for name, cls in LINEAR_LAYERS.items():
        if name != "jet":
            rules[name] = _rules_from_signature(cls)
    return rules


def check_block_config(config: Any, where: str) -> dict:
    """Check an `efficient_attention_config` (`{block type: {option: value}}`): every block type known, every option
    one the block takes, every value of the right type and range. Returns it as a plain dict."""
    if config is None:
        return {}
    if not isinstance(config, Mapping):
        raise InputError(f"{where}: must be a JSON object of block type -> options, got {show(config)}")
    rules = block_option_rules()
    out = {}
    for block, options in config.items():
        if block not in rules:
            raise InputError(f"{where}: unknown block type {show(block)}; known: {', '.join(rules)}")
        if not isinstance(options, Mapping):
            raise InputError(f"{where}: [{show(block)}]={show(options)}: must be an object of options")
        checked = dict(options)
        for key, value in options.items():
            field = f"[{show(block)}][{show(key)}]"
            rule = rules[block].get(key)
            if rule is None:
                raise InputError(f"{where}: {field}: {block} has no option {show(key)}; its options: "
                                 f"{', '.join(rules[block])}")
            if rule in ("size", "size?"):
                check_int(value, field, where, allow_none=rule == "size?")
            elif rule in ("positive", "positive text"):
                if rule == "positive text" and isinstance(value, str):
                    try:
                        value = float(value)
                    except ValueError:
                        raise InputError(f"{where}: {field}={show(value)}: must be a number") from None
                check_number(value, field, where, minimum=0.0)
            elif rule == "nonnegative":
                check_number(value, field, where, minimum=0.0, inclusive=True)
            elif rule == "bool":
                check_bool(value, field, where)
            elif rule == "layer sizes":
                checked[key] = check_layer_sizes(value, field, where)
            elif isinstance(rule, tuple):
                check_str(value, field, where, choices=rule)
            else:
                check_str(value, field, where)
        out[block] = checked
    return out


def check_layer_sizes(value: Any, field: str, where: str) -> dict[str, int]:
    """`{layer index: size}` (indices as ints or decimal strings, sizes ints >= 1) with string keys, as JSON keeps
    them, in layer order."""
    if not isinstance(value, Mapping):
        raise InputError(f"{where}: {field}={show(value)}: must be an object of layer index -> size")
    out = {}
    for key, size in value.items():
        if isinstance(key, bool) or not (isinstance(key, int) or (isinstance(key, str) and key.isdigit())):
            raise InputError(f"{where}: {field}: key {show(key)} is not a layer index")
        check_int(size, f"{field}[{show(key)}]", where)
        out[str(int(key))] = size
    return dict(sorted(out.items(), key=lambda item: int(item[0])))


def parse_block_config(value: str | Mapping | None, flag: str = "--block-config") -> dict | None:
    """`--block-config` (JSON text, or an already parsed dict) parsed and checked (`check_block_config`)."""
    if value is None:
        return None
    parsed = parse_json(value, flag) if isinstance(value, str) else value
    return check_block_config(parsed, flag)


def read_texts(path: str | Path) -> list[str]:
    """The documents of a text file: each row's "text" string of a `.jsonl(.gz)`, or the whole of any other file.
    Raises `InputError` naming the file (and line) for a row without a "text" string or a file with no text."""
    path = Path(path)
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        texts = []
        for lineno, row in iter_jsonl(path):
            if not isinstance(row.get("text"), str):
                what = f"text={show(row['text'])} is not a string" if "text" in row else \
                    f"no \"text\" field (its fields: {', '.join(sorted(row)) or 'none'})"
                raise InputError(f"{path} line {lineno}: {what}")
            texts.append(row["text"])
    else:
        try:
            texts = [path.read_text(encoding="utf-8")]
        except UnicodeDecodeError as err:
            raise InputError(f"{path}: not UTF-8 text (byte {err.start}); a token file must end in .bin") from None
    if not any(t.strip() for t in texts):
        raise InputError(f"{path}: holds no text")
    return texts
