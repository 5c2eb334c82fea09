"""Run a Python module with Triton's autotuning limited to N configs per kernel (`jetnas.ops.autotune`): a fast
start on a fresh GPU machine, slightly slower kernels. For `jetnas` commands until the CLI has an option for it
(the limit is a call now, never an environment variable read at import).

    python3 dev/lightly_tuned.py 4 -m jetnas run smollm2-135m-gpu ...
    python3 -m torch.distributed.run --standalone --nproc-per-node 1 dev/lightly_tuned.py 4 -m jetnas supernet ...
"""

from __future__ import annotations

import runpy
import sys

from jetnas.ops.autotune import limit_autotuning


def main() -> None:
    if len(sys.argv) < 4 or sys.argv[2] != "-m":
        sys.exit(f"usage: {sys.argv[0]} N -m MODULE [ARGS...]")
    limit_autotuning(int(sys.argv[1]))
    sys.argv = [sys.argv[3], *sys.argv[4:]]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
