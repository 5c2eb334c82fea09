"""Fixtures shared by the training tests of the stage losses' paths (the captured step, answer weights)."""

import pytest
import torch

from jetnas.models import JetNemotronForCausalLM
from jetnas.train import trainer as trainer_module
from tests.utils import tiny_config


@pytest.fixture(scope="module")
def models():
    """(teacher, student): a tiny all-attention teacher and a GDN / attention / sliding-window student (seed 0). A
    test module that needs other models defines its own `models`, which wins."""
    torch.manual_seed(0)
    teacher = JetNemotronForCausalLM(tiny_config(["attn"] * 4)).eval().requires_grad_(False)
    student = JetNemotronForCausalLM(tiny_config(["attn", "gdn", "swa", "gdn"]))
    return teacher, student


@pytest.fixture
def cpu_graph(monkeypatch):
    """Let `TrainConfig.cuda_graph=True` build a trainer on CPU (the static path then runs without a graph)."""
    monkeypatch.setattr(trainer_module, "check_graph_step", lambda *args: None)
