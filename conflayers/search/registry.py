"""The skip-set cache: a JSON file of searched skip sets keyed by (model identity, dataset).

    {"version": 1, "entries": {"<model id>::<dataset>": {entry fields}}}

JSON only (never pickle). Loading checks every field's type and that every layer is an
intermediate layer of the model at hand, and rejects anything else with a clear error.
Writes go to a temporary file in the same directory and are renamed into place (atomic).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..layers import num_layers

VERSION = 1


class RegistryError(ValueError):
    """A registry file or entry that cannot be used."""


@dataclass
class SkipSetEntry:
    model: str
    dataset: str
    layers: list[int]
    n_layers: int
    lam: float = 0.0
    objective: str = "throughput"
    score: float | None = None  # the objective's score of the set
    acceptance: float | None = None  # Σa / Σd
    tau: float | None = None  # mean tokens committed per step
    speedup: float | None = None  # measured tokens/s over plain decoding's, same process
    iterations: int = 0
    timestamp: float = field(default_factory=time.time)


def model_identity(model) -> str:
    """A model's cache key: its source name plus the shape that a skip set depends on."""
    cfg = model.config
    name = getattr(model, "name_or_path", None) or getattr(cfg, "_name_or_path", "") or type(model).__name__
    return f"{name}|{cfg.model_type}|L{num_layers(model)}|H{cfg.hidden_size}"


def entry_key(model_id: str, dataset: str) -> str:
    return f"{model_id}::{dataset}"


def _number(v, name: str, optional: bool = True) -> None:
    if v is None and optional:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise RegistryError(f"registry entry field {name!r} must be a finite number, got {v!r}")


def validate_entry(raw, n_layers: int | None = None) -> SkipSetEntry:
    """A ``SkipSetEntry`` from decoded JSON, or ``RegistryError`` saying what is wrong."""
    if not isinstance(raw, dict):
        raise RegistryError(f"registry entry must be a JSON object, got {type(raw).__name__}")
    names = {f.name for f in fields(SkipSetEntry)}
    unknown = set(raw) - names
    if unknown:
        raise RegistryError(f"registry entry has unknown field(s) {sorted(unknown)}")
    missing = {"model", "dataset", "layers", "n_layers"} - set(raw)
    if missing:
        raise RegistryError(f"registry entry lacks field(s) {sorted(missing)}")
    for name in ("model", "dataset", "objective"):
        if name in raw and not isinstance(raw[name], str):
            raise RegistryError(f"registry entry field {name!r} must be a string, got {raw[name]!r}")
    if raw.get("objective", "throughput") not in ("throughput", "acceptance"):
        raise RegistryError(f"registry entry objective must be 'throughput' or 'acceptance', got {raw['objective']!r}")
    for name in ("n_layers", "iterations"):
        v = raw.get(name, 0)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise RegistryError(f"registry entry field {name!r} must be a non-negative integer, got {v!r}")
    for name in ("lam", "timestamp"):
        if name in raw:
            _number(raw[name], name, optional=False)
    for name in ("score", "acceptance", "tau", "speedup"):
        _number(raw.get(name), name)
    L = raw["n_layers"]
    if n_layers is not None and L != n_layers:
        raise RegistryError(f"registry entry is for a {L}-layer model; this model has {n_layers} layers")
    layers = raw["layers"]
    if not isinstance(layers, list):
        raise RegistryError(f"registry entry field 'layers' must be a list of layer indices, got {layers!r}")
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int):
            raise RegistryError(f"registry entry layer {i!r} is not an integer")
        if not 1 <= i <= L - 2:
            raise RegistryError(
                f"registry entry layer {i} is out of range: only intermediate layers 1..{L - 2} of a {L}-layer model"
            )
    if len(set(layers)) != len(layers):
        raise RegistryError(f"registry entry layers repeat: {layers}")
    return SkipSetEntry(**{**raw, "layers": sorted(layers)})


def read_registry(path) -> dict:
    """The decoded file (an empty registry if the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return {"version": VERSION, "entries": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RegistryError(f"skip-set registry {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
        raise RegistryError(f"skip-set registry {path} must be an object with an 'entries' object")
    if data.get("version") != VERSION:
        raise RegistryError(f"skip-set registry {path} has version {data.get('version')!r}; expected {VERSION}")
    return data


def load_entry(path, model_id: str, dataset: str, n_layers: int | None = None) -> SkipSetEntry:
    data = read_registry(path)
    key = entry_key(model_id, dataset)
    if key not in data["entries"]:
        raise RegistryError(f"skip-set registry {path} has no entry for model {model_id!r} and dataset {dataset!r}")
    entry = validate_entry(data["entries"][key], n_layers)
    if entry.model != model_id or entry.dataset != dataset:
        raise RegistryError(f"skip-set registry {path}: entry {key!r} names model {entry.model!r}, dataset {entry.dataset!r}")
    return entry


def save_entry(path, entry: SkipSetEntry) -> None:
    """Add or replace ``entry`` (validated first); the file is rewritten atomically."""
    entry = validate_entry(asdict(entry))
    path = Path(path)
    data = read_registry(path)
    data["entries"][entry_key(entry.model, entry.dataset)] = asdict(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def entry_from_policy(policy, model, dataset: str) -> SkipSetEntry | None:
    """A registry entry describing a settled ``ConfLayersSearch`` (None for other policies)."""
    state = policy.state() if hasattr(policy, "state") else {}
    if state.get("searcher") != "conflayers":
        return None
    layers = state["skip_set"] if state["phase"] == "installed" else []
    return SkipSetEntry(
        model=model_identity(model),
        dataset=dataset,
        layers=list(layers or []),
        n_layers=num_layers(model),
        lam=float(state["lambda"]),
        objective=state["objective"],
        score=state["score"],
        acceptance=state["acceptance"],
        tau=state["tau"],
        speedup=state["speedup"],
        iterations=int(state["iterations"]),
    )
