"""Layer plans (bypass without mutation, exception safety) and sublayer capture."""

import pytest
import torch

from conflayers import capture_sublayers, skip_layers

from .conftest import tiny_model


def test_skipped_layer_passes_its_input_through_and_the_model_is_whole_afterwards():
    model = tiny_model("llama")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        full = model(ids, output_hidden_states=True)
        with skip_layers(model, [2]):
            skipped = model(ids, output_hidden_states=True)
        again = model(ids).logits
    # hidden_states[i] is the input of layer i: layer 2's output equals its input when skipped
    assert torch.equal(skipped.hidden_states[3], skipped.hidden_states[2])
    assert torch.equal(skipped.hidden_states[2], full.hidden_states[2])
    assert not torch.allclose(skipped.logits, full.logits)
    assert torch.equal(again, full.logits)
    assert model.config.num_hidden_layers == 6 and all("forward" not in l.__dict__ for l in model.model.layers)


def test_skipped_layer_writes_no_kv():
    from transformers import DynamicCache

    model = tiny_model("llama")
    cache = DynamicCache()
    with torch.no_grad(), skip_layers(model, [1, 3]):
        model(torch.tensor([[1, 2, 3]]), cache=cache, use_cache=True)
    lengths = [layer.get_seq_length() for layer in cache.layers]
    assert lengths[1] == 0 and lengths[3] == 0 and lengths[0] == lengths[2] == 3


def test_a_failing_draft_leaves_the_model_whole():
    model = tiny_model("llama")
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        before = model(ids).logits
        with pytest.raises(RuntimeError, match="boom"):
            with skip_layers(model, [1, 2, 3]):
                raise RuntimeError("boom")
        assert torch.equal(model(ids).logits, before)
    assert all("forward" not in l.__dict__ for l in model.model.layers)


def test_capture_gives_each_sublayer_output_before_the_residual_add():
    model = tiny_model("qwen2")
    ids = torch.tensor([[4, 5, 6, 7, 8]])
    with torch.no_grad():
        model(ids, output_hidden_states=True)  # transformers installs its own recording hooks on first use
    hooks_before = sum(len(m._forward_hooks) for m in model.modules())
    with torch.no_grad(), capture_sublayers(model) as cap:
        out = model(ids, output_hidden_states=True)
    assert sorted(cap) == list(range(6))
    for i in range(6):
        attn, mlp = cap[i]["attn"], cap[i]["mlp"]
        assert attn.shape == mlp.shape == (1, 5, 64)
        if i < 5:  # hidden_states[i+1] (the next layer's input) = input + attn + mlp (residual stream)
            assert torch.allclose(out.hidden_states[i] + attn + mlp, out.hidden_states[i + 1])
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks_before
