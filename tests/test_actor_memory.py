"""What each generation actor declares to Ray as ``memory`` (``pipeline.memory``): no Ray, no model loaded."""

from __future__ import annotations

import pytest

from pipeline.config import PipelineConfig
from pipeline.memory import GiB, RUNTIME_BYTES, model_bytes, parameters, plan


def _cfg(concurrency: int, cpus: float = 1.0, kv_gb=None, declared_gb=None) -> PipelineConfig:
    cfg = PipelineConfig()
    cfg.ray.concurrency, cfg.ray.num_cpus_per_actor, cfg.ray.memory_per_actor_gb = concurrency, cpus, declared_gb
    cfg.engine.kv_cache_gb = kv_gb
    return cfg


def test_cpu_actors_split_the_nodes_memory_among_those_ray_may_place_there():
    # 4 CPUs and 8 GiB a node: 4 actors of 1 CPU fit, each gets a 2 GiB share; the KV budget is half of
    # it less the model, and model + KV + runtime is what each declares
    nodes = [{"CPU": 4.0, "memory": 8 * GiB}, {"CPU": 4.0, "memory": 16 * GiB}]
    m = plan(_cfg(8), gpu=False, nodes=nodes, weights=GiB // 2)
    assert m.actors_per_node == 4 and m.kv_bytes == GiB - GiB // 2
    assert m.declared == GiB // 2 + m.kv_bytes + RUNTIME_BYTES == 2 * GiB
    assert m.config.engine.kv_cache_gb == pytest.approx(0.5)  # the actors are told their budget
    # fewer actors than fit: the share is larger (only 2 land on a node)
    two = plan(_cfg(2), gpu=False, nodes=nodes, weights=GiB // 2)
    assert two.actors_per_node == 2 and two.kv_bytes == 2 * GiB - GiB // 2
    # 2 CPUs an actor: 2 a node
    assert plan(_cfg(8, cpus=2.0), gpu=False, nodes=nodes, weights=0).kv_bytes == 2 * GiB


def test_a_set_kv_budget_or_figure_is_kept_and_a_figure_over_the_share_is_capped(caplog):
    nodes = [{"CPU": 4.0, "memory": 8 * GiB}]
    m = plan(_cfg(4, kv_gb=4.0), gpu=False, nodes=nodes, weights=GiB)
    assert m.kv_bytes == 4 * GiB and m.declared == 2 * GiB  # 1 + 4 + 1 GiB wanted, the share is 2 GiB
    assert "declares the share" in caplog.text
    assert m.config.engine.kv_cache_gb == 4.0
    assert plan(_cfg(4, declared_gb=3.0), gpu=False, nodes=nodes, weights=GiB).declared == 3 * GiB


def test_gpu_actors_declare_the_model_and_runtime_in_host_memory_their_kv_is_on_the_gpu():
    nodes = [{"CPU": 16.0, "GPU": 2.0, "memory": 64 * GiB}]
    m = plan(_cfg(4), gpu=True, nodes=nodes, weights=3 * GiB)
    assert m.actors_per_node == 2 and m.kv_bytes is None and m.config.engine.kv_cache_gb is None
    assert m.declared == 3 * GiB + RUNTIME_BYTES


def test_model_bytes_are_read_from_the_safetensors_headers(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.save_pretrained(tmp_path)
    n = sum(p.numel() for p in model.parameters())
    assert parameters(tmp_path) == n
    assert model_bytes(str(tmp_path), "bfloat16") == 2 * n and model_bytes(str(tmp_path), "float32") == 4 * n
    assert model_bytes(str(tmp_path / "missing"), "float32") is None
