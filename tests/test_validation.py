"""Bad input ends in one line naming the file, field and value (issue 17, item 6): model config.json files, a config
declaring more layers than its weights hold, data files, token ids beyond the vocabulary, `--block-config`, task
files; through the functions and through `jetnas` itself (exit 2, `jetnas: error: ...`), never a traceback, never
exit 0."""

import gzip
import json
import re
import shutil

import numpy as np
import pytest

from jetnas.cli import main
from jetnas.models.hf_compat import load_pretrained
from jetnas.train.data import TokenStream, resolve_data
from jetnas.validation import (
    InputError,
    check_token_ids,
    iter_jsonl,
    open_token_file,
    parse_block_config,
    read_json,
    read_model_config,
)
from tests.utils import _CORPUS, save_tiny_llama, tiny_tokenizer

L = 4


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny Llama teacher on disk (as tests/train/test_stages.py builds it), a text file, a private data cache."""
    root = tmp_path_factory.mktemp("validation")
    save_tiny_llama(root / "teacher", num_layers=L)
    (root / "train.txt").write_text(_CORPUS * 20)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JETNAS_CACHE", str(root / "cache"))
        yield root


def teacher_with(workspace, tmp_path, edit) -> str:
    """A copy of the tiny teacher whose config.json text is `edit(text)`."""
    path = tmp_path / "teacher"
    shutil.copytree(workspace / "teacher", path)
    config = path / "config.json"
    config.write_text(edit(config.read_text()))
    return str(path)


def set_field(name, value):
    def edit(text):
        config = json.loads(text)
        config[name] = value
        return json.dumps(config)

    return edit


def train_cli(workspace, tmp_path, capsys, *extra, teacher=None, data=None) -> str:
    """`jetnas train --stage 1` on the tiny teacher; asserts exit 2 and returns the one error line."""
    capsys.readouterr()
    code = main(["train", "--stage", "1", "--teacher", teacher or str(workspace / "teacher"), "--layer-types",
                 "attn,jet,gdn,attn", "--data", data or str(workspace / "train.txt"), "--steps", "2", "--batch-size",
                 "2", "--seq-len", "16", "--heldout-tokens", "32", "--device", "cpu", "--out-dir",
                 str(tmp_path / "run"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err[-5:]
    assert err[-1].startswith("jetnas: error: "), err[-5:]
    return err[-1]


@pytest.mark.parametrize("edit, message", [
    (lambda t: t[: len(t) // 2], r"config.json: not valid JSON \(.* at line \d+, column \d+\)"),
    (set_field("hidden_size", -32), r"config.json: hidden_size=-32: must be an integer >= 1"),
    (set_field("num_key_value_heads", 0), r"config.json: num_key_value_heads=0: must be an integer >= 1"),
    (set_field("intermediate_size", "64"), r"config.json: intermediate_size='64': must be an integer >= 1"),
    (set_field("num_key_value_heads", 3), r"config.json: num_attention_heads=4 is not a multiple of "
                                          r"num_key_value_heads=3"),
    (set_field("rms_norm_eps", -1e-6), r"config.json: rms_norm_eps=-1e-06: must be > 0.0"),
    (set_field("num_hidden_layers", L + 2), rf"config.json: the config declares 18 weights that .*teacher does not "
                                            rf"hold \(model.layers.{L}.input_layernorm.weight, .* and 12 more\): it "
                                            rf"does not match the weights"),
], ids=["invalid-json", "negative", "kv-heads-0", "string", "heads-not-multiple", "negative-eps", "more-layers"])
def test_a_bad_teacher_config_fails_naming_file_field_and_value(workspace, tmp_path, capsys, edit, message):
    line = train_cli(workspace, tmp_path, capsys, teacher=teacher_with(workspace, tmp_path, edit))
    assert str(tmp_path / "teacher" / "config.json") in line
    assert re.search(message, line), line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_load_pretrained_refuses_weights_missing_for_declared_layers(workspace, tmp_path):
    path = teacher_with(workspace, tmp_path, set_field("num_hidden_layers", L + 2))
    with pytest.raises(InputError, match=rf"declares 18 weights .*model.layers.{L}.input_layernorm.weight"):
        load_pretrained(path)
    assert load_pretrained(workspace / "teacher").config.num_hidden_layers == L  # the intact one loads


@pytest.mark.parametrize("value, message", [
    ('{"jet": {"num_heads": -2}}', r"\['jet'\]\['num_heads'\]=-2: must be an integer >= 1"),
    ('{"jet": {"heads": 2}}', r"\['jet'\]\['heads'\]: jet has no option 'heads'"),
    ('{"lstm": {}}', r"unknown block type 'lstm'; known: swa, jet, gdn"),
    ('{"gdn": {"head_k_dim": "8"}}', r"\['gdn'\]\['head_k_dim'\]='8': must be an integer >= 1"),
    ('{"swa": {"window_size": 0}}', r"\['swa'\]\['window_size'\]=0: must be an integer >= 1"),
])
def test_a_bad_block_config_fails_naming_key_and_value(workspace, tmp_path, capsys, value, message):
    line = train_cli(workspace, tmp_path, capsys, "--block-config", value)
    assert re.search(message, line), line
    with pytest.raises(InputError, match="--block-config: " + message):
        parse_block_config(value)


def test_parse_block_config():
    assert parse_block_config('{"jet": {"num_heads": 2, "head_dim": 8, "expand_v": "2.0"}, "swa": '
                              '{"window_size": 64}}') == {"jet": {"num_heads": 2, "head_dim": 8, "expand_v": "2.0"},
                                                          "swa": {"window_size": 64}}
    assert parse_block_config(None) is None
    with pytest.raises(InputError, match=r"--block-config: not valid JSON"):
        parse_block_config("{jet: 1}")
    with pytest.raises(InputError, match=r"--block-config: must be a JSON object of block type -> options, got "
                                         r"\[1\]"):
        parse_block_config("[1]")


def write_bin(path, ids, dtype="<u2"):
    np.asarray(ids, dtype=dtype).tofile(path)
    return str(path)


@pytest.mark.parametrize("make, message", [
    (lambda p: (p.write_text('{"text": "a fine row"}\n{"title": "no text"}\n'), str(p))[1],
     r"docs.jsonl line 2: no \"text\" field \(its fields: title\)"),
    (lambda p: (p.write_text('{"text": "a fine row"}\n{"text": 42}\n'), str(p))[1],
     r"docs.jsonl line 2: text=42 is not a string"),
    (lambda p: (p.write_text('{"text": "a fine row"}\n{"text": "cut\n'), str(p))[1],
     r"docs.jsonl line 2: not valid JSON"),
    (lambda p: (p.write_text("\n\n"), str(p))[1], r"docs.jsonl: holds no text"),
    (lambda p: write_bin(p.with_suffix(".bin"), []), r"docs.bin: the token file is empty"),
    (lambda p: (p.with_suffix(".bin").write_bytes(b"\x01\x00\x02"), str(p.with_suffix(".bin")))[1],
     r"docs.bin: 3 bytes is not a whole number of 2-byte token ids"),
    (lambda p: write_bin(p.with_suffix(".bin"), np.arange(400) % 300 + 60000),
     r"training data docs.bin: token id 60000 at position 0 is outside the model's vocabulary"),
], ids=["jsonl-no-text", "jsonl-not-string", "jsonl-cut", "empty-text", "empty-bin", "odd-bin", "ids-beyond-vocab"])
def test_bad_training_data_fails_naming_the_file(workspace, tmp_path, capsys, make, message):
    data = make(tmp_path / "docs.jsonl")
    line = train_cli(workspace, tmp_path, capsys, data=data)
    assert re.search(message, line), line
    assert str(tmp_path) in line or "training data docs.bin" in line


def test_a_truncated_data_cache_is_rebuilt(workspace, capsys):
    tok = tiny_tokenizer()
    stream, _ = resolve_data(str(workspace / "train.txt"), tok, teacher_eos=tok.eos_token_id)
    cached = next((workspace / "cache" / "data").glob("text-*.bin"))
    data = cached.read_bytes()
    cached.write_bytes(data[: len(data) // 4 * 2])  # a whole number of ids: only the sidecar's count can tell
    with pytest.raises(InputError, match=r"holds \d+ token ids, its text-.*\.bin\.json says \d+ \(truncated\?\)"):
        TokenStream.from_file(cached)
    capsys.readouterr()
    again, _ = resolve_data(str(workspace / "train.txt"), tok, teacher_eos=tok.eos_token_id)
    assert "damaged data cache" in capsys.readouterr().err
    assert len(again) == len(stream) and cached.read_bytes() == data


def test_json_and_jsonl_readers_name_file_and_line(tmp_path):
    bad = tmp_path / "state.json"
    bad.write_text('{"step": 4, "param')
    with pytest.raises(InputError, match=r"state.json: not valid JSON \(Unterminated string .* line 1"):
        read_json(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(InputError, match=r"state.json: expected a JSON object, got list \[1, 2\]"):
        read_json(bad)
    gz = tmp_path / "rows.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(2000)))
    data = gz.read_bytes()
    gz.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"rows.jsonl.gz: damaged gzip file after line \d+"):
        list(iter_jsonl(gz))
    with pytest.raises(InputError, match=r"config.json: vocab_size=0: must be an integer >= 1"):
        (tmp_path / "config.json").write_text('{"vocab_size": 0}')
        read_model_config(tmp_path)
    with pytest.raises(InputError, match=r"config.json: eos_token_id=\[1, 500\]: beyond the vocabulary"):
        (tmp_path / "config.json").write_text('{"vocab_size": 100, "eos_token_id": [1, 500]}')
        read_model_config(tmp_path)


def test_token_checks(tmp_path):
    ids = np.arange(1000, dtype="<u2")
    check_token_ids(ids, 1000, "ok")
    with pytest.raises(InputError, match=r"x.bin: token id 999 at position 999 is outside the model's vocabulary of "
                                         r"999"):
        check_token_ids(ids, 999, "x.bin", chunk=128)
    path = tmp_path / "t.bin"
    write_bin(path, [1, 2, 3], dtype="<u4")
    (tmp_path / "t.bin.json").write_text('{"dtype": "<f4"}')
    with pytest.raises(InputError, match=r"t.bin.json: dtype='<f4': token ids are uint16 or uint32"):
        open_token_file(path)
    (tmp_path / "t.bin.json").write_text('{"dtype": "<u4", "tokens": 3}')
    assert open_token_file(path).tolist() == [1, 2, 3]


def test_mc_on_an_empty_file_fails_instead_of_scoring_zero(workspace, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    capsys.readouterr()
    code = main(["eval", "--model", str(workspace / "teacher"), "--tasks", f"mc:{tmp_path / 'empty.jsonl'}",
                 "--device", "cpu", "--out-dir", str(tmp_path / "eval")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == f"jetnas: error: {tmp_path / 'empty.jsonl'}: no rows (an empty task file)"
