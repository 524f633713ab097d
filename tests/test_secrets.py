"""Credentials and model loading: a storage secret given through ``${oc.env:...}`` reaches S3 but no
output file, log or error message; a literal one is warned about; pickle weights and remote code
are refused unless asked for."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest
import torch

from jobs.generate import load_config
from pipeline.config import PipelineConfig
from tests.pipeline_helpers import MotoS3, job_overrides, save_tiny_model, write_corpus


def test_a_literal_secret_in_a_config_file_or_on_the_command_line_is_a_warning(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("MY_TEST_SECRET", "from-env")
    f = tmp_path / "c.yaml"
    f.write_text("storage:\n  secret: abcdefghijklmnopqrstuvwx\n")
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        load_config(str(f), [])
        load_config(None, ["storage.key=AKIAEXAMPLE"])
    msgs = [r.getMessage() for r in caplog.records]
    assert any("storage.secret is written out literally in " + str(f) in m for m in msgs)
    assert any("storage.key is written out literally in the command line" in m for m in msgs)
    assert not any("abcdefghijklmnopqrstuvwx" in m or "AKIAEXAMPLE" in m for m in msgs)  # never the value itself
    caplog.clear()
    f.write_text("storage:\n  secret: ${oc.env:MY_TEST_SECRET}\n")
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        load_config(str(f), ["storage.key=${oc.env:MY_TEST_KEY,null}"])
    assert not caplog.records


def test_an_environment_secret_resolves_and_a_missing_one_is_an_error_naming_the_key(monkeypatch):
    monkeypatch.setenv("MY_TEST_SECRET", "value-from-env")
    cfg = load_config(None, ["storage.secret=${oc.env:MY_TEST_SECRET}"])
    assert isinstance(cfg, PipelineConfig) and cfg.storage.secret == "value-from-env"
    monkeypatch.delenv("MY_TEST_SECRET")
    with pytest.raises(ValueError, match="storage.secret") as e:
        load_config(None, ["storage.secret=${oc.env:MY_TEST_SECRET}"])
    assert "value-from-env" not in str(e.value)


@pytest.mark.slow
def test_the_secret_reaches_s3_but_no_output_log_or_metadata(ray_local, tmp_path, monkeypatch, capfd):
    from jobs.generate import main

    secret = f"s3cr3t-{uuid.uuid4().hex}"
    monkeypatch.setenv("CONFLAYERS_TEST_S3_SECRET", secret)
    model = save_tiny_model(tmp_path / "model")
    write_corpus(tmp_path / "c.jsonl", n=4)
    with MotoS3() as server:
        s3 = server.client
        s3.create_bucket(Bucket="secrets-test")
        s3.upload_file(str(tmp_path / "c.jsonl"), "secrets-test", "in/c.jsonl")
        storage = {**server.storage, "storage.secret": "${oc.env:CONFLAYERS_TEST_S3_SECRET}"}
        assert main(job_overrides(model, "s3://secrets-test/in/", "s3://secrets-test/out", **storage)) == 0
        objects = [o["Key"] for o in s3.list_objects_v2(Bucket="secrets-test", Prefix="out/")["Contents"]]
        assert "out/run_config.yaml" in objects and any(k.startswith("out/generations/") for k in objects)
        for key in objects:  # every byte written: YAML, JSON, Parquet data and metadata
            body = s3.get_object(Bucket="secrets-test", Key=key)["Body"].read()
            assert secret.encode() not in body, key
        run_config = s3.get_object(Bucket="secrets-test", Key="out/run_config.yaml")["Body"].read().decode()
        assert "secret: '***'" in run_config and "key: '***'" in run_config
    logs = capfd.readouterr()
    assert secret not in logs.out and secret not in logs.err


def test_pickle_weights_are_refused_unless_allowed(tmp_path):
    from conflayers.models import load_model

    d = Path(save_tiny_model(tmp_path / "m"))
    state = {k: v for k, v in __import__("safetensors.torch", fromlist=["load_file"]).load_file(
        d / "model.safetensors").items()}
    torch.save(state, d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"holds only pickle weights \(pytorch_model.bin\): loading them can run "
                                         r"arbitrary code.*model.allow_pickle=true"):
        load_model(str(d))
    model, _ = load_model(str(d), allow_pickle=True)  # a checkpoint the user vouches for
    assert model.config.model_type == "llama"
    for f in d.glob("*.bin"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="holds no model weights"):
        load_model(str(d))


def test_remote_code_is_not_run_unless_trusted(tmp_path):
    from conflayers.models import load_model

    d = Path(save_tiny_model(tmp_path / "m"))
    cfg = (d / "config.json").read_text().replace('"model_type": "llama"', '"model_type": "llama", "auto_map": '
                                                   '{"AutoConfig": "evil.EvilConfig"}')
    (d / "config.json").write_text(cfg)
    (d / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    model, _ = load_model(str(d))  # auto_map ignored: the library's own Llama classes, no code from the repo
    assert type(model).__module__.startswith("transformers.")
