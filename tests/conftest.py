import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_model(family: str = "llama", layers: int = 6, vocab: int = 97, dtype=torch.float64, seed: int = 0, std=0.02):
    """A random-init decoder built from a config (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=std,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise ValueError(family)
    return model.to(dtype).eval()


@pytest.fixture(scope="session", autouse=True)
def private_caches(tmp_path_factory):
    """Every cache a test writes goes to a temporary directory, never the user's ``~/.cache/conflayers``:
    ``$CONFLAYERS_CACHE`` (width and cost-surface timings) and ``$TORCHINDUCTOR_CACHE_DIR`` (compiled
    steps). Converted models stay where the user keeps them (``$CONFLAYERS_MODELS``): converting
    SmolLM2 takes ~40 s, once. Set in ``os.environ`` before any test runs, so the subprocesses and Ray
    workers tests start inherit it (``tests/test_caches.py`` checks a run leaves the user's alone)."""
    from conflayers.models import default_cache_dir

    root = tmp_path_factory.mktemp("caches")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CONFLAYERS_MODELS", str(default_cache_dir()))
        mp.setenv("CONFLAYERS_CACHE", str(root))
        mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor"))
        yield root


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run far faster on one thread when the CPU is shared (opt in per module)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny(request):
    return tiny_model(request.param)


RAGGED = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [20, 21, 22, 23], [1]]


@pytest.fixture(scope="session")
def smollm2():
    from conflayers.models import load_model

    return load_model()


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray for one test module (the job tests run the pipeline on it in-process)."""
    import ray

    # a fresh local cluster even if another Ray runs on this machine (address=local never joins one)
    ray.init(address="local", num_cpus=3, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()
