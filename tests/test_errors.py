"""Bad input gets a clear exception naming the bad value."""

import pytest

from conflayers import Engine, GenerationConfig, LayerSkipDrafter, SamplingParams, validate_skip_set
from conflayers.layers import decoder_layers

from .conftest import tiny_model


@pytest.fixture(scope="module")
def engine():
    return Engine(tiny_model("llama"))


def test_empty_prompt(engine):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1, 2], []])


def test_prompt_longer_than_context(engine):
    with pytest.raises(ValueError, match="prompt 0 has 300 tokens; the model's context is 256"):
        engine.generate([[1] * 300])


def test_token_out_of_vocabulary(engine):
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 97\): \[500\]"):
        engine.generate([[1, 500]])


@pytest.mark.parametrize("layer", [0, 5, 6, -1, 40])
def test_skip_set_index_out_of_range(layer):
    with pytest.raises(ValueError, match=f"skip-set layer {layer} is out of range"):
        validate_skip_set([2, layer], 6)


def test_skip_set_entry_not_an_index():
    with pytest.raises(ValueError, match="'x' is not a layer index"):
        validate_skip_set([2, "x"], 6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -0.5}, "temperature must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
        ({"top_k": -1}, "top_k must be an integer >= 0"),
    ],
)
def test_bad_sampling_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("n", [0, -3])
def test_bad_max_new_tokens(n):
    with pytest.raises(ValueError, match=f"max_new_tokens must be an integer >= 1, got {n}"):
        GenerationConfig(max_new_tokens=n)


def test_bad_drafter_settings():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="stop_threshold must be in"):
        LayerSkipDrafter(model, stop_threshold=1.5)
    with pytest.raises(ValueError, match="max_draft_len must be >= 1"):
        LayerSkipDrafter(model, max_draft_len=0)


def test_unsupported_architecture_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="unsupported model type 'gpt2'.*llama, qwen2, mistral"):
        decoder_layers(model)
