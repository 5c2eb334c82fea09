"""Teacher-text generation shows progress as tokens are sampled, from the first decoding step, and samples exactly
what it sampled before the bar moved per step (the bar is a logits processor that changes nothing)."""

import torch

from jetnas.models import JetNemotronForCausalLM
from jetnas.train import data
from tests.evaluation.test_tasks import RecordingBar
from tests.utils import tiny_config, tiny_tokenizer


def test_the_generation_bar_moves_with_every_step(monkeypatch):
    monkeypatch.setattr(data, "tqdm", RecordingBar)
    RecordingBar.made = []
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = JetNemotronForCausalLM(tiny_config(["attn", "jet"], vocab_size=len(tok))).eval()
    ids = data._sample_text(model, tok, tok.eos_token_id, 200, seed=0, batch_size=4, length=30, name="tiny")
    bar = RecordingBar.made[-1]
    assert len(ids) >= 200 and bar.total == 200 and bar.n == 200
    # batches of 4 rows x up to 30 steps: an update of at most 4 tokens per step, plus one per batch for its prompts
    # (a bar advanced per batch made one update per batch, after the whole batch)
    per_step = [u for u in bar.updates if u <= 4]
    assert len(per_step) >= 10 and len(bar.updates) - len(per_step) <= -(-len(ids) // 4)
    # the same samples as without a bar: the seed alone decides them
    monkeypatch.setattr(data, "_StepProgress", lambda bar, start, eos: (lambda input_ids, scores: scores))
    assert data._sample_text(model, tok, tok.eos_token_id, 200, seed=0, batch_size=4, length=30, name="tiny") == ids
