"""Kernel plans: the oneDNN plan computes what the default kernels compute, composes with layer
skipping and sublayer capture, releases what it replaces, and undoes cleanly.

oneDNN has no float64 kernels, so these tests run the tiny models in float32 (fixed seeds; on a
float32 model the plan changes rounding only, far below these models' top-1 margins)."""

import pytest
import torch

from conflayers import Engine, FixedSkip, GenerationConfig, LayerSkipDrafter
from conflayers.kernels import apply_kernels, choose, current_plan, is_packed, restore_native
from conflayers.layers import capture_sublayers, skip_layers

from .conftest import RAGGED, tiny_model

N_NEW = 20


@pytest.fixture(params=["llama", "qwen2"])
def tiny32(request):
    # std 0.2: logits spread enough that every greedy step has a clear winner
    return tiny_model(request.param, dtype=torch.float32, std=0.2, seed=1)


def linears(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)]


def logits(model, ids):
    with torch.inference_mode():
        return model(torch.tensor(ids)).logits


def test_onednn_logits_match_the_default_kernels(tiny32):
    ids = [[5, 6, 7, 8, 9, 10], [3, 4, 1, 2, 60, 61]]
    ref = logits(tiny32, ids)
    plan = apply_kernels(tiny32, "onednn")
    assert plan.name == "onednn" and plan.linears == len(linears(tiny32))
    assert all(is_packed(m) for m in linears(tiny32))
    torch.testing.assert_close(logits(tiny32, ids), ref, rtol=1e-4, atol=1e-5)


def test_greedy_output_with_the_plan_equals_without_it_plain_and_speculative(tiny32):
    cfg = GenerationConfig(max_new_tokens=N_NEW, stop_token_ids=())
    skip = list(range(1, tiny32.config.num_hidden_layers - 1, 2))
    native = Engine(tiny32, "native")
    assert native.kernel_plan.name == "native"
    ref_plain = [r.token_ids for r in native.generate(RAGGED, cfg)]
    engine = Engine(tiny32, "auto")
    assert engine.kernel_plan.name == "onednn"
    plain = [r.token_ids for r in engine.generate(RAGGED, cfg)]
    drafter = LayerSkipDrafter(tiny32, FixedSkip(skip), stop_threshold=0.0, max_draft_len=4)
    spec = engine.generate(RAGGED, cfg, drafter)
    assert plain == ref_plain
    assert [r.token_ids for r in spec] == ref_plain
    assert sum(r.stats.drafted for r in spec) > 0 and sum(r.stats.accepted for r in spec) > 0


def test_plan_composes_with_layer_skipping_and_sublayer_capture(tiny32):
    ids = [[5, 6, 7, 8, 9, 10]]
    with skip_layers(tiny32, [1, 3]):
        ref_draft = logits(tiny32, ids)
    with capture_sublayers(tiny32) as ref_cap, torch.inference_mode():
        tiny32(torch.tensor(ids))
    apply_kernels(tiny32, "onednn")
    with skip_layers(tiny32, [1, 3]):
        draft = logits(tiny32, ids)
    torch.testing.assert_close(draft, ref_draft, rtol=1e-4, atol=1e-5)
    with capture_sublayers(tiny32) as cap, torch.inference_mode():
        tiny32(torch.tensor(ids))
    assert sorted(cap) == sorted(ref_cap)
    for layer in ref_cap:
        for kind in ("attn", "mlp"):
            torch.testing.assert_close(cap[layer][kind], ref_cap[layer][kind], rtol=1e-4, atol=1e-5)


def test_packed_weights_replace_the_dense_ones_and_restore_exactly():
    model = tiny_model("llama", dtype=torch.float32, seed=2)  # untied head
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    before = sum(p.numel() for p in model.parameters())
    ids = [[1, 2, 3, 4]]
    ref = logits(model, ids)
    plan = apply_kernels(model, "onednn")
    assert plan.extra_bytes == 0
    assert all(m.weight.numel() == 0 and m.weight.dtype == torch.float32 for m in linears(model))
    linear_params = sum(dense[n].numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                        for n in [n + ".weight"])
    assert sum(p.numel() for p in model.parameters()) == before - linear_params
    restore_native(model)
    assert current_plan(model).name == "native"
    assert not any(is_packed(m) for m in linears(model))
    for n, p in model.named_parameters():
        assert torch.equal(p, dense[n]), n
    assert torch.equal(logits(model, ids), ref)


def test_tied_head_keeps_the_embedding_and_packs_a_copy():
    model = tiny_model("llama", dtype=torch.float32, seed=3)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    emb = model.model.embed_tokens.weight.detach().clone()
    ids = [[7, 8, 9, 10, 11]]
    ref = logits(model, ids)
    plan = apply_kernels(model, "onednn")
    assert is_packed(model.lm_head)
    assert plan.extra_bytes == emb.numel() * emb.element_size()
    assert torch.equal(model.model.embed_tokens.weight, emb)  # the embedding still looks tokens up
    torch.testing.assert_close(logits(model, ids), ref, rtol=1e-4, atol=1e-5)
    restore_native(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_a_second_engine_on_the_same_model_does_not_repack(tiny32):
    first = Engine(tiny32).kernel_plan
    packed = [m.__dict__["_conflayers_packed"][0] for m in linears(tiny32)]
    second = Engine(tiny32).kernel_plan
    assert second is first
    assert [m.__dict__["_conflayers_packed"][0] for m in linears(tiny32)] == packed


def test_auto_falls_back_where_onednn_cannot_run_and_onednn_says_why():
    model = tiny_model("llama", dtype=torch.float64)
    name, reason = choose(model, "auto")
    assert name == "native" and "float64" in reason
    assert Engine(model).kernel_plan.name == "native"
    assert not any(is_packed(m) for m in linears(model))
    with pytest.raises(ValueError, match="not possible here: oneDNN has no float64"):
        apply_kernels(model, "onednn")
    with pytest.raises(ValueError, match="kernels must be one of auto, native, onednn"):
        Engine(model, "fast")
