"""Cache writes under concurrency: the ranks of one torchrun job tokenise the same text into the same cache file at
once (CI once failed on exactly that: one rank renamed the shared `.partial` away from under the other)."""

import threading
from pathlib import Path

import numpy as np
import pytest

from jetnas.files import publish_dir, temp_sibling
from jetnas.train.data import TokenStream, _write_bin


def _race(n: int, fn) -> list[BaseException]:
    start, errors = threading.Barrier(n), []

    def run(i):
        start.wait()
        try:
            fn(i)
        except BaseException as err:  # noqa: BLE001 - collected and reported by the test
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_concurrent_writers_of_one_cache_file(tmp_path):
    data = np.arange(50_000) % 60_000
    target = tmp_path / "text-key.bin"
    for _ in range(5):
        target.unlink(missing_ok=True)
        assert _race(8, lambda i: _write_bin(target, data, np.dtype("<u2"))) == []
        assert np.array_equal(np.asarray(TokenStream.from_file(target).array), data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text-key.bin", "text-key.bin.json"]  # no leftovers


def test_temp_names_are_unique_per_writer(tmp_path):
    names = {temp_sibling(tmp_path / "x.bin") for _ in range(100)}
    assert len(names) == 100 and all(p.parent == tmp_path and p.name.endswith(".partial") for p in names)


def _dir(path: Path, files: dict[str, str]) -> Path:
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def test_publish_dir_keeps_the_first_complete_copy(tmp_path):
    target = _dir(tmp_path / "hf", {"model.safetensors": "first"})
    late = _dir(temp_sibling(target), {"model.safetensors": "second"})
    publish_dir(late, target, complete="model.safetensors")
    assert (target / "model.safetensors").read_text() == "first" and not late.exists()


def test_publish_dir_replaces_an_incomplete_copy(tmp_path):
    target = _dir(tmp_path / "hf", {"config.json": "{}"})  # an older version's half-written directory
    fresh = _dir(temp_sibling(target), {"model.safetensors": "new"})
    publish_dir(fresh, target, complete="model.safetensors")
    assert (target / "model.safetensors").read_text() == "new" and not fresh.exists()


def test_publish_dir_race(tmp_path):
    target = tmp_path / "hf"

    def write(i):
        publish_dir(_dir(temp_sibling(target), {"model.safetensors": str(i)}), target, complete="model.safetensors")

    assert _race(8, write) == []
    assert (target / "model.safetensors").read_text() in {str(i) for i in range(8)}
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_publish_dir_reports_a_missing_source(tmp_path):
    with pytest.raises(OSError):
        publish_dir(tmp_path / "missing", tmp_path / "hf", complete="model.safetensors")
