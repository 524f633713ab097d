"""Shared helpers for the pipeline tests: a tiny random model with the SmolLM2 tokenizer, a corpus."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path


def save_tiny_model(path: Path, layers: int = 4, context: int = 256, seed: int = 0, tied: bool = True) -> str:
    """A random-init Llama with SmolLM2's tokenizer, saved as a local HF directory (no download).
    With ``tied`` embeddings it echoes its last input token (its greedy text after a chat prompt is
    newlines); untied, it writes (random) words."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from conflayers.models import BUNDLED, resolve_source

    tok = AutoTokenizer.from_pretrained(resolve_source(BUNDLED)[0])
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=context,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, tie_word_embeddings=tied)
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def write_corpus(path: Path, n: int = 6, datasets=("alpha", "beta")) -> list[str]:
    rows = [{"id": f"r{i}", "dataset": datasets[i % len(datasets)], "prompt": f"Tell me fact number {i}.",
             "reference": f"fact number {i}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [r["id"] for r in rows]


def job_overrides(model: str, corpus: str, out: str, **extra) -> list[str]:
    base = {
        "model.source": model, "input.path": corpus, "output.path": out, "generation.max_tokens": 8,
        "ray.batch_size": 2, "engine.max_batch": 2, "ray.concurrency": 1, "search.drafter": "layerskip",
        "search.searcher": "static",
        "search.skip_layers": "[1]", "search.stop_threshold": 0.0, "search.max_draft_len": 2,
        "baseline.min_per_dataset": 1,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_with_venv() -> dict:
    import sys

    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


class MotoS3:
    """An S3 server (moto, server mode) on a free loopback port, with a boto3 client and the job's
    storage overrides: ``with MotoS3() as s3: s3.client.create_bucket(...); s3.storage``."""

    def __enter__(self):
        import boto3
        from moto.server import ThreadedMotoServer

        port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
        self.server.start()
        self.endpoint = f"http://127.0.0.1:{port}"
        self.client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                                   aws_secret_access_key="testing", region_name="us-east-1")
        self.storage = {"storage.endpoint_url": self.endpoint, "storage.key": "testing",
                        "storage.secret": "not-a-real-secret", "storage.region": "us-east-1"}
        return self

    def __exit__(self, *exc):
        self.server.stop()
