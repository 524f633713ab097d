"""Packed grouped-query attention computes what transformers' SDPA computes, without copying keys and
values, and the engine switches GQA models to it losslessly."""

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from conflayers import Engine, FixedSkip, GenerationConfig, LayerSkipDrafter
from conflayers.attention import NAME, packed_sdpa, use_packed_attention
from .test_engine_greedy import every_other

from .conftest import RAGGED, tiny_model


class _Module(torch.nn.Module):
    def __init__(self, n_rep):
        super().__init__()
        self.num_key_value_groups = n_rep


@pytest.mark.parametrize("q", [1, 2, 5])
@pytest.mark.parametrize("n_rep", [1, 3])
def test_packed_attention_matches_sdpa_with_repeated_keys(q, n_rep):
    torch.manual_seed(q * 10 + n_rep)
    b, kv_heads, d, kv_len = 3, 2, 16, 40
    query = torch.randn(b, q, kv_heads * n_rep, d, dtype=torch.float64).transpose(1, 2)  # as the models make it
    keys, values = (torch.randn(b, kv_heads, kv_len + 8, d, dtype=torch.float64)[:, :, :kv_len] for _ in range(2))
    # each row sees its own prefix, as the engine's mask says (ragged lengths, the rest masked)
    ends = torch.tensor([12, 30, kv_len - q])[:, None] + torch.arange(q)[None]
    mask = (torch.arange(kv_len)[None, None] <= ends[:, :, None])[:, None]
    module = _Module(n_rep)
    ref, _ = sdpa_attention_forward(module, query, keys, values, mask, scaling=0.25)
    out, _ = packed_sdpa(module, query, keys, values, mask, scaling=0.25)
    assert out.shape == (b, q, kv_heads * n_rep, d)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_the_engine_switches_gqa_models_and_stays_lossless():
    model = tiny_model("llama")
    assert model.config._attn_implementation == "sdpa"
    cfg = GenerationConfig(max_new_tokens=12, stop_token_ids=())
    # reference: transformers' own SDPA (the model as loaded), padded batch through generate
    width = max(map(len, RAGGED))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in RAGGED])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in RAGGED])
    with torch.inference_mode():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)[:, width:]
    engine = Engine(model)
    assert engine.attention == NAME == model.config._attn_implementation
    drafter = LayerSkipDrafter(model, FixedSkip(every_other(model)), stop_threshold=0.0, max_draft_len=4)
    for d in (None, drafter):  # the drafter's verify passes score up to 5 tokens per row
        assert [r.token_ids for r in engine.generate(RAGGED, cfg, d)] == want.tolist()
    with torch.inference_mode():  # generate on the switched model (its masks still built) agrees too
        again = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert again[:, width:].tolist() == want.tolist()


def test_models_without_grouped_query_attention_or_on_eager_are_left_alone():
    eager = tiny_model("llama")
    eager.set_attn_implementation("eager")
    assert use_packed_attention(eager) == "eager"
    from transformers import LlamaConfig, LlamaForCausalLM

    mha = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=4))
    assert use_packed_attention(mha) == "sdpa"
