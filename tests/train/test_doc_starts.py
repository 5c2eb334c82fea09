"""Rows at document starts (`doc_starts`, issue 19: HellaSwag's prompts are a document's opening read from a fresh
state, which rows cut on a fixed grid almost never are): the share of such rows follows the setting in every prefix
of the run, each starts right after an end-of-document id, the other rows keep their grid windows, batches stay a
pure function of (seed, step) and shard exactly, recall documents keep their grid, 0 is today's batches bit for bit,
and bad values or streams without documents fail clearly."""

import json

import numpy as np
import pytest
import torch

from jetnas.train.data import TokenStream, WindowBatcher, document_starts
from jetnas.train.mixture import Mixture, MixtureBatcher, Source
from jetnas.train.stages import StageConfig, train_stage
from jetnas.validation import InputError
from tests.train.test_answer_weight import write_recall_bin
from tests.train.test_stages import workspace  # noqa: F401 (fixture)
from tests.utils import _CORPUS

EOS = 0


def documents(lengths, seed=0) -> TokenStream:
    """Documents of the given lengths, each followed by EOS; a document's tokens are 1000 + its index (uint16), so a
    row tells which document it starts in."""
    parts = [np.concatenate([np.full(n, 1000 + d), [EOS]]) for d, n in enumerate(lengths)]
    return TokenStream(np.concatenate(parts).astype("<u2"), name="docs")


def test_document_starts_are_the_first_token_and_every_token_after_eos_with_room_for_a_row():
    stream = documents([5, 20, 3, 40])  # starts 0, 6, 27, 31; 72 tokens
    assert document_starts(stream, EOS, 1).tolist() == [0, 6, 27, 31]
    assert document_starts(stream, EOS, 42).tolist() == [0, 6, 27]  # 31 + 42 > 72
    _, tail = stream.split(45)  # the tail starts at 27, right after an EOS: its first token is a document start
    assert document_starts(tail, EOS, 1).tolist() == [0, 4]
    mid = TokenStream(stream.array, start=8)  # mid-document: not a start
    assert document_starts(mid, EOS, 1).tolist() == [19, 23]
    with pytest.raises(InputError, match="no end-of-document id 7"):
        document_starts(stream, 7, 1)
    with pytest.raises(InputError, match="eos_id"):
        document_starts(stream, None, 1)


def test_a_share_of_rows_starts_at_documents_and_the_rest_keep_their_windows():
    rng = np.random.default_rng(0)
    stream = documents(rng.integers(5, 120, size=300).tolist())
    seq = 16
    starts = set(document_starts(stream, EOS, seq + 1).tolist())
    plain = WindowBatcher(stream, seq, 8, seed=4)
    batcher = WindowBatcher(stream, seq, 8, seed=4, doc_starts=0.25, eos_id=EOS)
    at_docs = 0
    for step in range(100):
        for j, (s, w) in enumerate(zip(batcher.starts(step), plain.windows(step))):
            n = step * 8 + j + 1
            if batcher.at_document(n - 1):
                assert s in starts, (step, j, s)
                at_docs += 1
            else:
                assert s == w * seq  # the grid window it always had
            # low discrepancy: every prefix of the run within two rows of the share
            assert abs(at_docs - 0.25 * n) <= 2, n
        rows = batcher.batch(step)
        assert rows.shape == (8, seq + 1)
        for row, s in zip(rows, batcher.starts(step)):
            assert torch.equal(row, stream.tokens(s, seq + 1))
    assert abs(at_docs - 200) <= 2
    # documents are drawn across the stream, not a few of them
    drawn = {s for step in range(100) for s in batcher.starts(step) if s in starts}
    assert len(drawn) > 120
    # a pure function of (seed, step): random access, other seeds differ, ranks take contiguous shares
    fresh = WindowBatcher(stream, seq, 8, seed=4, doc_starts=0.25, eos_id=EOS)
    assert fresh.starts(57) == batcher.starts(57) and fresh.starts(3) == batcher.starts(3)
    assert WindowBatcher(stream, seq, 8, seed=5, doc_starts=0.25, eos_id=EOS).starts(57) != batcher.starts(57)
    assert torch.equal(torch.cat([batcher.batch(9, r, 4) for r in range(4)]), batcher.batch(9))
    every = WindowBatcher(stream, seq, 8, seed=4, doc_starts=1.0, eos_id=EOS)
    assert all(s in starts for step in range(20) for s in every.starts(step))


def test_zero_is_the_grid_bit_for_bit():
    stream = documents([30] * 50)
    off = WindowBatcher(stream, 16, 4, seed=2, doc_starts=0.0, eos_id=EOS)
    plain = WindowBatcher(stream, 16, 4, seed=2)
    for step in (0, 7, 40):
        assert torch.equal(off.batch(step), plain.batch(step))
        assert off.starts(step) == [w * 16 for w in plain.windows(step)]


def test_a_mixture_starts_text_rows_at_documents_and_keeps_recall_documents_on_their_grid(tmp_path):
    text = documents([37] * 200)
    write_recall_bin(tmp_path / "recall.bin", documents=64)
    recall = TokenStream.from_file(tmp_path / "recall.bin")
    mixture = Mixture([Source("docs", text, 0.5), Source(str(tmp_path / "recall.bin"), recall, 0.5)], weighted=True)
    batcher = mixture.batcher(32, 8, seed=1, doc_starts=1.0, eos_id=EOS)
    assert [b.doc_starts for b in batcher.sources] == [1.0, 0.0]
    text_starts = set(document_starts(text, EOS, 33).tolist())
    for step in range(20):
        for (k, s), (kk, w) in zip(batcher.starts(step), batcher.windows(step)):
            assert k == kk
            assert s in text_starts if k == 0 else s == w * 32
    # the default is the grid, bit for bit
    plain = MixtureBatcher([(text, 0.5), (recall, 0.5)], 32, 8, seed=1)
    assert torch.equal(mixture.batcher(32, 8, seed=1, eos_id=EOS).batch(5), plain.batch(5))
    only_recall = Mixture([Source(str(tmp_path / "recall.bin"), recall, 1.0)], weighted=False)
    with pytest.raises(ValueError, match="every source is recall documents"):
        only_recall.batcher(32, 8, doc_starts=0.5, eos_id=EOS)


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), True, "half"])
def test_doc_starts_must_be_a_share(value):
    with pytest.raises(ValueError, match="doc_starts"):
        WindowBatcher(documents([30] * 10), 16, 4, doc_starts=value, eos_id=EOS)
    with pytest.raises(ValueError, match="doc_starts"):
        StageConfig(stage=1, layer_types="attn,gdn", doc_starts=value)


def test_a_stage_trains_on_document_start_rows_and_records_the_setting(workspace, tmp_path):  # noqa: F811
    """A stage 1 with an alignment phase and doc_starts=0.5 on documents of the tiny teacher's text (a .jsonl: one
    document a row, each ended by the EOS): it runs, and its identity records the share (runs before the option keep
    theirs); one long document has no starts to offer, and says so."""
    lines = [line for line in _CORPUS.splitlines() if line.strip()]
    rows = [{"text": " ".join(lines[i % len(lines) : i % len(lines) + 3])} for i in range(60)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = dict(stage=1, teacher=str(workspace / "teacher"), layer_types="attn,gdn,gdn,swa", swa_window=8,
                  data=str(tmp_path / "docs.jsonl"), steps=3, batch_size=2, seq_len=32, heldout_tokens=256,
                  device="cpu", align_steps=2)
    config = StageConfig(**common, doc_starts=0.5, out_dir=str(tmp_path / "docs"))
    result = train_stage(config)
    assert result.summary["steps"] == 3
    assert config.identity([], {}, "t")["doc_starts"] == 0.5
    assert "doc_starts" not in StageConfig(**common, out_dir=str(tmp_path / "x")).identity([], {}, "t")
    with pytest.raises(InputError, match="no end-of-document id"):
        train_stage(StageConfig(**{**common, "data": str(workspace / "train.txt")}, doc_starts=0.5,
                                out_dir=str(tmp_path / "one")))
