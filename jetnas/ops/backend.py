"""Choosing between the PyTorch references and the fast GPU kernels, once, when a layer is built."""

from __future__ import annotations

import functools
import warnings

BACKENDS = ("auto", "torch", "triton")


@functools.cache
def fla_usable() -> bool:
    from jetnas.ops import _fla

    return _fla.is_available()


@functools.cache
def triton_usable() -> bool:
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # a broken triton install must not break the CPU paths
        return False
    return True


@functools.cache
def _warn_missing_fla() -> None:
    warnings.warn(
        "CUDA is available but flash-linear-attention is not importable: linear-attention layers fall back to the "
        "PyTorch references (correct, much slower). Install the GPU extra: pip install 'jetnas[gpu]'.",
        stacklevel=3,
    )


def resolve_backend(backend: str = "auto") -> str:
    """Resolve a layer's kernel backend to "torch" or "triton".

    "auto" picks "triton" (fla's kernels and ours) when CUDA, Triton and fla are all usable, warning once when
    only fla is missing, and "torch" otherwise. Ops still run the reference on CPU tensors whatever the backend, so a model built on one device
    can move to another.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if fla_usable():
        return "triton"
    if backend == "triton":
        raise ValueError("backend='triton' needs CUDA and flash-linear-attention (pip install 'jetnas[gpu]')")
    import torch

    if torch.cuda.is_available():
        _warn_missing_fla()
    return "torch"
