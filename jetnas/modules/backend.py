"""Switching a built model (or layer) to another kernel backend, explicitly.

Every module that dispatches to kernels (the token mixers, norms and MLPs) holds the `Backend` it was built with;
`set_backend` replaces it everywhere below a module at once, e.g. for a benchmark that times one set of weights
under two backends in one process. Nothing switches a backend implicitly.
"""

from __future__ import annotations

from torch import nn

from jetnas.ops.backend import Backend, resolve_backend


def set_backend(module: nn.Module, backend: Backend | str) -> Backend:
    """Resolve `backend` once and give it to `module` and every submodule that holds a backend; returns it.

    A model captured in a CUDA graph (`jetnas.engine.graph.StaticDecoder`) keeps the kernels it was captured with:
    prepare a new decoder after switching.
    """
    resolved = resolve_backend(backend)
    for m in module.modules():
        if isinstance(getattr(m, "backend", None), Backend):
            m.backend = resolved
    return resolved
