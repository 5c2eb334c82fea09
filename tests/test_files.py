"""Cache writes under concurrency: the ranks of one torchrun job tokenise the same text into the same cache file at
once (CI once failed on exactly that: one rank renamed the shared `.partial` away from under the other). Threads
stand in for processes: each opens its own lock file description, and `flock` excludes those within one process
too."""

import threading
from pathlib import Path

import numpy as np
import pytest

from jetnas.files import atomic_dir, atomic_path, build_lock, publish_dir, temp_sibling, write_json_atomic
from jetnas.train.data import TokenStream, _write_bin, tokenize_files


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


class _CountingTokenizer:
    name_or_path = "counting"

    def __init__(self):
        self.calls = 0

    def __len__(self):
        return 300

    def __call__(self, text, add_special_tokens=False):
        self.calls += 1
        return {"input_ids": [ord(c) % 256 for c in text]}


def test_ranks_tokenise_a_corpus_once(tmp_path, monkeypatch):
    monkeypatch.setenv("JETNAS_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "train.txt"
    text.write_text("the quick brown fox " * 200)
    tok = _CountingTokenizer()
    streams = {}
    assert _race(6, lambda i: streams.__setitem__(i, tokenize_files([text], tok, eos_id=0))) == []
    assert tok.calls == 1  # one builder; the other five waited and read its file
    want = [ord(c) % 256 for c in text.read_text()] + [0]
    assert all(s.tokens(0, len(s)).tolist() == want for s in streams.values())


def test_build_lock_serialises_builders(tmp_path):
    target, built, inside = tmp_path / "thing.bin", [], []

    def build(i):
        with build_lock(target):
            inside.append(i)
            assert len(inside) == 1  # nobody else in here
            if not target.exists():
                built.append(i)
                target.write_text(str(i))
            inside.remove(i)

    assert _race(8, build) == []
    assert len(built) == 1 and target.read_text() == str(built[0])


def test_build_lock_without_a_writable_cache_still_builds(tmp_path, monkeypatch):
    import builtins

    real_open = builtins.open

    def no_lock_files(path, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise PermissionError(13, "read-only cache", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_lock_files)
    with build_lock(tmp_path / "x.bin"):
        (tmp_path / "x.bin").write_text("built")
    assert (tmp_path / "x.bin").read_text() == "built"


def test_an_interrupted_atomic_write_leaves_the_old_file_and_no_leftovers(tmp_path):
    target = tmp_path / "pipeline.json"
    write_json_atomic(target, {"stages": {"a": 1}})
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text('{"stages": {"a": 1, "b"')  # half written when the run is killed
            raise KeyboardInterrupt
    assert target.read_text() == '{\n  "stages": {\n    "a": 1\n  }\n}'
    assert [p.name for p in tmp_path.iterdir()] == ["pipeline.json"]


def test_atomic_dir_replaces_the_old_directory_only_when_complete(tmp_path):
    target = _dir(tmp_path / "model", {"model.safetensors": "old"})
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as partial:
            (partial / "model.safetensors").write_text("half")
            raise RuntimeError("killed while saving")
    assert (target / "model.safetensors").read_text() == "old"
    with atomic_dir(target) as partial:
        (partial / "model.safetensors").write_text("new")
    assert [p.name for p in target.iterdir()] == ["model.safetensors"]
    assert (target / "model.safetensors").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
