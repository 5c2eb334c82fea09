"""dev/carry_model.py: a trained stage's model carried between device machines as the tensors training changed,
rebuilt exactly on a fresh base (the whole state's digest checked), through the staging folders; damaged or missing
parts and a different base are errors."""

import json
import sys
from pathlib import Path

import pytest
import torch

from jetnas.models.hf_compat import load_pretrained
from jetnas.train.stages import StageConfig, train_stage
from tests.utils import _CORPUS, save_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "dev"))


@pytest.fixture(scope="module")
def stage1_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("carry")
    save_tiny_llama(root / "teacher", num_layers=4)
    (root / "train.txt").write_text(_CORPUS * 10)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JETNAS_CACHE", str(root / "cache"))
        train_stage(StageConfig(stage=1, teacher=str(root / "teacher"), layer_types="attn,gdn,swa,gdn", swa_window=8,
                                data=str(root / "train.txt"), steps=3, batch_size=2, seq_len=32, heldout_tokens=256,
                                out_dir=str(root / "stage1"), device="cpu"))
    return root / "stage1" / "model"


def test_a_stage_model_goes_back_and_forth_exactly(stage1_model, tmp_path):
    from carry_model import pack, stage, unpack

    manifest = pack(stage1_model, tmp_path / "back", part_bytes=10_000)
    assert manifest["parts"] > 2
    # stage 1 trains the token mixers only: the frozen MLPs, norms and embeddings stay home
    assert 0 < manifest["carried"] < manifest["tensors"]
    returned = tmp_path / "returned"  # as files come back from a call: flat
    returned.mkdir()
    for f in (tmp_path / "back" / "mparts").iterdir():
        (returned / f.name).write_bytes(f.read_bytes())
    for name in ("manifest.json", "modelfiles.tar"):
        (returned / name).write_bytes((tmp_path / "back" / name).read_bytes())
    folders = stage(returned, tmp_path / ".stage", per_folder=2)
    assert [f.name for f in folders] == [f"m{i}" for i in range(len(folders))]
    device_stage = tmp_path / "device"  # the staging calls: cp -r .stage/mK/. /root/stage/
    for f in folders:
        for src in f.rglob("*"):
            if src.is_file():
                dst = device_stage / src.relative_to(f)
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(src.read_bytes())
    unpack(device_stage / "mparts", tmp_path / "model")
    original = load_pretrained(stage1_model).state_dict()
    rebuilt = load_pretrained(tmp_path / "model").state_dict()
    assert original.keys() == rebuilt.keys()
    assert all(torch.equal(original[k], rebuilt[k]) for k in original)
    assert (tmp_path / "model" / "jetnas_stage.json").read_text() == (stage1_model / "jetnas_stage.json").read_text()
    assert (tmp_path / "model" / "tokenizer_config.json").exists()


def test_damaged_missing_parts_and_another_base_are_errors(stage1_model, tmp_path):
    from carry_model import pack, unpack

    pack(stage1_model, tmp_path / "back", part_bytes=10_000)
    parts = tmp_path / "back" / "mparts"
    for name in ("manifest.json", "modelfiles.tar"):
        (parts / name).write_bytes((tmp_path / "back" / name).read_bytes())
    first = parts / "mpart.01"
    good = first.read_bytes()
    first.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(ValueError, match="do not match the manifest's sha256"):
        unpack(parts, tmp_path / "m1")
    first.unlink()
    with pytest.raises(FileNotFoundError, match=r"mpart.01"):
        unpack(parts, tmp_path / "m2")
    first.write_bytes(good)
    manifest = json.loads((parts / "manifest.json").read_text())
    (parts / "manifest.json").write_text(json.dumps({**manifest, "layer_types": ["attn", "gdn", "gdn", "gdn"]}))
    with pytest.raises(ValueError, match="base model lacks|shapes the base|digest"):
        unpack(parts, tmp_path / "m3")
    assert not (tmp_path / "m3").exists()
    (parts / "manifest.json").write_text(json.dumps({**manifest, "digest": "0" * 64}))
    with pytest.raises(ValueError, match="is not the trained one's"):
        unpack(parts, tmp_path / "m4")
    assert not (tmp_path / "m4").exists()
