"""jetnas: PostNAS (Jet-Nemotron, arXiv 2508.15884) for anyone's pretrained model.

Turn a full-attention transformer into a hybrid of a few full-attention / sliding-window layers and linear-attention
JetBlocks, then train, evaluate and serve it fast. See `jetnas.layers` for the block zoo and `jetnas.ops` for the
kernels; ARCHITECTURE.md for how the package is laid out.

After `import jetnas`, the `jet_nemotron` model type is registered with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained` loads a jetnas model directory. Importing jetnas itself stays light: the
registration (which needs torch and transformers, seconds to import) happens as soon as transformers is imported,
by anyone, or right away if it already is. So the `jetnas` command answers `--help`, a misspelled recipe or a bad
flag without loading either.
"""

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"


def _register() -> None:
    from jetnas import models  # noqa: F401  (registers jet_nemotron with the Auto classes)


class _RegisterWithTransformers(importlib.abc.MetaPathFinder):
    """Registers jetnas's model type right after transformers finishes importing (once)."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)  # transformers' own finder answers; this one only wraps its loader
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_then_register
        return spec


def __getattr__(name: str):
    # `jetnas.models`, `jetnas.engine`, ... as attributes without importing them up front
    if name in {"bench", "engine", "evaluation", "layers", "models", "modules", "nas", "ops", "runner", "train"}:
        return importlib.import_module(f"jetnas.{name}")
    raise AttributeError(f"module 'jetnas' has no attribute {name!r}")


if "transformers" in sys.modules:
    _register()
elif not any(isinstance(finder, _RegisterWithTransformers) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWithTransformers())
