"""Task names as written in `--tasks`, read without importing torch: which are built-in (`jetnas.evaluation.tasks`)
and which go to lm-evaluation-harness (`jetnas.evaluation.harness`), so a command can refuse a task it cannot run
before anything loads."""

from __future__ import annotations

import importlib.util

#: the kinds of built-in task, written `KIND:TARGET` (`mc:PATH`, `retrieval:kv@4096`, ...)
BUILTIN_KINDS = ("ppl", "mc", "cloze", "retrieval")


def is_builtin(spec: str) -> bool:
    """Whether `spec` names a built-in task (`KIND:...` with a built-in kind); anything else is a harness task."""
    return spec.split(":", 1)[0] in BUILTIN_KINDS and ":" in spec


def check_harness_available(specs: list[str]) -> None:
    """Refuse harness tasks when lm-evaluation-harness is not installed, in one line saying how to install it."""
    harness = [s for s in specs if not is_builtin(s)]
    if harness and importlib.util.find_spec("lm_eval") is None:
        kinds = ", ".join(f"{k}:" for k in BUILTIN_KINDS)
        raise ValueError(f"{', '.join(harness)}: lm-evaluation-harness task(s) (built-in tasks start with {kinds}), "
                         f"which need lm_eval: pip install 'jetnas[eval]'")
