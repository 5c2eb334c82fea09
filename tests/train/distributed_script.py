"""Run by test_torchrun_two_processes_match_one, with or without torchrun: 6 steps on a tiny model."""

import sys
from pathlib import Path

import numpy as np
import torch

from jetnas.train.data import TokenStream
from jetnas.train.distributed import teardown
from jetnas.train.trainer import TrainConfig, Trainer
from tests.train.test_trainer import lm_loss, tiny_model


def main(out: str, mode: str) -> None:
    out_dir = Path(out)
    data = (np.arange(5000) % 11).astype("<u2")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"tokens-{torch.distributed.get_rank() if torch.distributed.is_initialized() else 0}.bin"
    data.tofile(path)
    model = tiny_model()
    cfg = TrainConfig(steps=6, batch_size=4, seq_len=16, lr=1e-3, warmup_steps=1, out_dir=out, distributed=mode,
                      save_every=3)
    Trainer(cfg, model, lm_loss, TokenStream.from_file(path)).fit()
    teardown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
