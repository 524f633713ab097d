"""What each generation actor declares to Ray as ``memory``: the model's bytes plus its KV budget.

Ray places actors by their declared resources, so an actor that declares no memory can be packed
onto a node whose memory it does not fit, and Ray Data warns that it "uses X of memory per worker
but Ray only requests 0.0B". Per actor:

- **CPU actors** hold the model and the KV cache in host memory. The node's budget is its Ray
  ``memory`` resource split among the actors Ray may place there (``min(ray.concurrency, node CPUs
  // ray.num_cpus_per_actor)``, the smallest node that can take one); without
  ``engine.kv_cache_gb`` the KV budget is half of that share less the model (it was half of the
  node's free memory, as if each actor were alone), and the actor is told it. Declared:
  model + KV + 1 GiB (the runtime: Python, torch, buffers), at most the share.
- **GPU actors** hold both on the GPU (one actor per GPU, so its KV default of half the free GPU
  memory stays right); host memory is the model's bytes on their way there plus the runtime.

``ray.memory_per_actor_gb`` overrides the declared figure. The model's bytes are read from its
safetensors headers (parameters x the configured dtype), without loading it.
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass, replace
from pathlib import Path

log = logging.getLogger(__name__)

GiB = 1 << 30
RUNTIME_BYTES = GiB  # Python, torch, transformers and the engine's buffers, measured at ~0.6-0.9 GiB USS
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
_ST_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass
class ActorMemory:
    declared: int | None  # bytes each actor declares (None: nothing known to declare)
    kv_bytes: int | None  # the KV budget each actor is given (None: its own default)
    model_bytes: int | None
    actors_per_node: int
    config: object  # the job's config, with the KV budget filled in where it was left to the default


def _weights_dir(source: str) -> Path | None:
    p = Path(source).expanduser()
    if p.is_dir():
        return p
    if source.endswith(".gguf") or "/" not in source:
        return None
    try:  # a hub id already in the local cache
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, local_files_only=True, allow_patterns=["*.json", "*.safetensors"]))
    except Exception:  # noqa: BLE001 - not cached, or no hub library: unknown
        return None


def parameters(directory: Path) -> int | None:
    """Parameters in a model directory's safetensors files, from their headers only (None: none there)."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return None
    n = 0
    for f in files:
        with open(f, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        for name, t in header.items():
            if name != "__metadata__":
                count = 1
                for d in t["shape"]:
                    count *= d
                n += count
    return n


def model_bytes(source: str, dtype: str) -> int | None:
    from conflayers.models import BUNDLED, bundled_gguf_path

    if source == BUNDLED:
        source = str(bundled_gguf_path())
    d = _weights_dir(source)
    n = parameters(d) if d is not None else None
    if n is None and (source.endswith(".gguf") and Path(source).is_file()):
        return Path(source).stat().st_size * DTYPE_BYTES.get(dtype, 4) // 2  # stored at ~2 bytes a weight or fewer
    return None if n is None else n * DTYPE_BYTES.get(dtype, 4)


def actors_per_node(node: dict, cfg, gpu: bool) -> int:
    """How many of this job's actors Ray may place on a node with these resources."""
    r = cfg.ray
    fit = int(node.get("GPU", 0)) if gpu else int(node.get("CPU", 0) // r.num_cpus_per_actor)
    return min(r.concurrency, fit)


def plan(cfg, gpu: bool, nodes: list[dict], weights: int | None) -> ActorMemory:
    """The memory each actor declares and the KV budget it gets, on nodes with these Ray resources."""
    r, e = cfg.ray, cfg.engine
    hosts = [(n.get("memory", 0), actors_per_node(n, cfg, gpu)) for n in nodes]
    shares = [mem // k for mem, k in hosts if k >= 1 and mem > 0]
    share = min(shares) if shares else None
    per = max((k for _, k in hosts), default=1)
    model = weights or 0
    kv = None if e.kv_cache_gb is None else int(e.kv_cache_gb * GiB)
    if not gpu and kv is None and share is not None:
        kv = max(64 << 20, share // 2 - model)
        cfg = replace(cfg, engine=replace(e, kv_cache_gb=kv / GiB))
    if r.memory_per_actor_gb is not None:
        declared = int(r.memory_per_actor_gb * GiB)
    elif weights is None and kv is None:
        declared = None
    else:
        declared = model + RUNTIME_BYTES + (0 if gpu else (kv or 0))
        if share is not None and declared > share:
            log.warning("each actor needs ~%.1f GiB (model %.1f + KV %.1f + runtime 1) but a node's share is %.1f GiB: "
                        "it declares the share; lower engine.kv_cache_gb or ray.concurrency if actors run out of memory",
                        declared / GiB, model / GiB, (kv or 0) / GiB, share / GiB)
            declared = share
    return ActorMemory(declared, kv, weights, per, cfg)


def actor_memory(cfg, gpu: bool) -> ActorMemory:
    """``plan`` on the live cluster's nodes, for the job's model (logged)."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    try:
        weights = model_bytes(cfg.model.source, cfg.model.dtype)
    except (OSError, ValueError, KeyError) as e:
        log.warning("model size unknown (%s): actors declare only their KV budget and runtime", e)
        weights = None
    m = plan(cfg, gpu, nodes, weights)
    log.info("each actor declares %s of memory to Ray (model %s, KV budget %s, up to %d actor(s) a node)",
             _gib(m.declared), _gib(m.model_bytes), _gib(m.kv_bytes), m.actors_per_node)
    return m


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / GiB:.2f} GiB"
