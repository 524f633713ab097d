"""The bad-input table: every kind of bad input a user can give the generation job, across the command
line, the job config, corpus rows, the skip-set registry and the model source, with the exact error
(or error row) each gets. The "Bad input" table of docs/reliability.md lists the same cases."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from jobs.generate import load_config
from pipeline.reader import read_rows

CONFIG_CASES = [  # (what, overrides, exact message)
    ("an override without =", ["input.path"], "overrides must be key=value, got 'input.path'"),
    ("an unknown key", ["input.pth=x"], "input.pth: Key 'pth' not in 'InputConfig'. Did you mean: 'path'?"),
    ("a value of the wrong type", ["ray.concurrency=two"],
     "ray.concurrency: Value 'two' of type 'str' could not be converted to Integer"),
    ("no actors", ["ray.concurrency=0"], "ray.concurrency: must be >= 1, got 0"),
    ("top_p out of range", ["generation.top_p=2"], "generation.top_p: must be in (0, 1], got 2.0"),
    ("an unknown input format", ["input.format=xml"],
     "input.format: must be one of ('records', 'specbench', 'gsm8k'), got 'xml'"),
    ("a width that is not a number", ["engine.max_batch=wide"],
     "engine.max_batch: must be auto or an integer >= 1, got 'wide'"),
    ("a registry on S3", ["search.registry=s3://b/r.json"],
     "search.registry: must be a local path (the registry is a local JSON file)"),
    ("the cached searcher without a registry", ["search.searcher=cached"],
     "search.registry: the cached searcher reads its skip sets from a registry: set search.registry to its JSON file"),
    ("a batch timeout of 0", ["ray.batch_timeout_s=0"], "ray.batch_timeout_s: must be > 0 seconds or null (no limit), got 0.0"),
    ("a missing environment variable for a secret", ["storage.secret=${oc.env:CONFLAYERS_NO_SUCH_VARIABLE}"],
     "storage.secret: Environment variable 'CONFLAYERS_NO_SUCH_VARIABLE' not found"),
]


@pytest.mark.parametrize("what, overrides, message", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_and_command_line_values(what, overrides, message):
    with pytest.raises(ValueError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_a_missing_or_malformed_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"--config: no such file: {tmp_path / 'nope.yaml'}")):
        load_config(str(tmp_path / "nope.yaml"), [])
    (tmp_path / "bad.yaml").write_text("ray: [1, 2\n")
    with pytest.raises(ValueError, match=re.escape(f"--config: {tmp_path / 'bad.yaml'} is not valid YAML "
                                                   "(line 2, column 1): did not find expected ',' or ']'")):
        load_config(str(tmp_path / "bad.yaml"), [])
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="must hold a mapping of sections"):
        load_config(str(tmp_path / "list.yaml"), [])


def test_the_command_line_reports_bad_input_in_one_line(tmp_path, capsys):
    from jobs.generate import main

    (tmp_path / "bad.yaml").write_text("ray: [1, 2\n")
    assert main(["--config", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"config error: --config: {tmp_path / 'bad.yaml'} is not valid YAML (line 2, column 1): "
                   "did not find expected ',' or ']'"]


ROW_CASES = [  # (what, JSONL line, error_type, error_message)
    ("malformed JSON", '{"id": "b", "prompt": ', "malformed_json", "not valid JSON (Expecting value at column 23)"),
    ("an empty prompt", '{"id": "c", "prompt": ""}', "empty_prompt", "prompt is empty"),
    ("a prompt that is not text", '{"id": "d", "prompt": 5}', "bad_prompt", "prompt must be text, got int"),
    ("max_tokens out of range", '{"id": "e", "prompt": "x", "max_tokens": 0}', "bad_max_tokens",
     "max_tokens must be in [1, 4096], got 0"),
    ("neither prompt nor messages", '{"id": "f"}', "empty_prompt", "the record has neither 'prompt' nor 'messages'"),
    ("messages that are not a chat list", '{"id": "g", "messages": "hello"}', "bad_prompt",
     "messages is text but not a JSON chat list"),
    ("a record that is not an object", "[1, 2]", "bad_record", "expected an object, got list"),
]


def test_bad_corpus_rows_become_error_rows_and_good_ones_pass(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_text("\n".join(['{"id": "ok", "prompt": "fine"}'] + [c[1] for c in ROW_CASES]) + "\n")
    rows = read_rows(str(f))
    assert len(rows) == 1 + len(ROW_CASES)  # one row per record, none dropped
    assert rows[0]["id"] == "ok" and rows[0]["error_type"] is None
    for (what, _, etype, msg), row in zip(ROW_CASES, rows[1:]):
        assert (row["error_type"], row["error_message"]) == (etype, msg), what


def test_a_corrupt_registry_file(tmp_path):
    from conflayers.search.registry import RegistryError, load_entry

    (tmp_path / "reg.json").write_text("{not json")
    with pytest.raises(RegistryError, match=re.escape(f"skip-set registry {tmp_path / 'reg.json'} is not valid JSON")):
        load_entry(str(tmp_path / "reg.json"), "model", "dataset")


def test_bad_model_sources(tmp_path):
    from conflayers.models import load_model

    with pytest.raises(FileNotFoundError, match=re.escape(f"model path not found: {tmp_path / 'none'}")):
        load_model(str(tmp_path / "none"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'empty'} is a directory but holds no "
                                                          "config.json (not a Hugging Face model)")):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=re.escape(f"GGUF file not found: {tmp_path / 'x.gguf'}")):
        load_model(str(tmp_path / "x.gguf"))
    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (gpt / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(f"unsupported model type 'gpt2' in {gpt}: supported are "
                                                   "llama, qwen2, mistral")):
        load_model(str(gpt))
    (gpt / "model.safetensors").unlink()
    (gpt / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="holds only pickle weights"):
        load_model(str(gpt))
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_model(str(gpt), dtype="int3")


def test_the_docs_list_every_case():
    page = (Path(__file__).resolve().parents[1] / "docs" / "reliability.md").read_text()
    table = page[page.index("## Bad input"):]
    for what, *_ in CONFIG_CASES + ROW_CASES:
        assert what in table, what
