"""The price table: instance types, the accelerators they hold, and $/instance-hour.

``configs/prices.yaml`` (or any file given as ``prices.path``, local or ``s3://``)::

    currency: USD
    instances:
      - name: aws-g6.xlarge          # unique
        accelerator: L4              # matched, case-insensitively, as whole words of the accelerator
                                     # a run reports ("NVIDIA L4", not "NVIDIA L40S"); cpu for CPU runs
        accelerators: 1              # GPUs per instance (GPU rows)
        vcpus: 4                     # vCPUs per instance (CPU rows: a CPU run pays per vCPU its actors hold)
        on_demand: 0.8048            # $/instance-hour, required, > 0
        spot: 0.32                   # $/instance-hour, optional (null: not offered / unknown)
        source: https://aws.amazon.com/ec2/pricing/on-demand/
        as_of: "2025-06"

A GPU run pays ``on_demand / accelerators`` per GPU-hour for the GPUs its actors hold; a CPU run
``on_demand / vcpus`` per vCPU-hour for the vCPUs its actors hold (``ray.concurrency`` x threads).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import yaml

from .. import io as storage_io
from ..config import StorageConfig


@dataclass(frozen=True)
class InstancePrice:
    name: str
    accelerator: str
    units: int  # GPUs per instance (GPU rows) or vCPUs per instance (CPU rows)
    on_demand: float
    spot: float | None
    source: str
    as_of: str

    @property
    def is_cpu(self) -> bool:
        return self.accelerator.lower() == "cpu"

    def unit_hour(self, pricing: str) -> float | None:
        """$ per GPU-hour (GPU rows) or per vCPU-hour (CPU rows); None where ``pricing`` is not offered."""
        price = self.on_demand if pricing == "on_demand" else self.spot
        return None if price is None else price / self.units

    def matches(self, accelerator: str) -> bool:
        """Whether this row prices ``accelerator``: its name appears in it as whole words
        ("L4" prices "NVIDIA L4", not "NVIDIA L40S")."""
        want = re.escape(self.accelerator.lower())
        return re.search(rf"(^|[^a-z0-9]){want}($|[^a-z0-9])", accelerator.lower()) is not None


@dataclass(frozen=True)
class PriceTable:
    path: str
    currency: str
    instances: tuple[InstancePrice, ...]

    def for_accelerator(self, accelerator: str, only: list[str] | None = None) -> list[InstancePrice]:
        """The instance rows that price ``accelerator`` (as a run reports it); an error naming it if none."""
        rows = [p for p in self.instances if p.matches(accelerator) and (not only or p.name in only)]
        if not rows:
            known = sorted({p.accelerator for p in self.instances})
            raise ValueError(f"accelerator {accelerator!r} has no price in {self.path} (priced: {', '.join(known)}"
                             + (f"; instances limited to {only}" if only else "")
                             + "): add an instance row for it or edit prices.path")
        return rows


def _number(row: dict, key: str, where: str, required: bool) -> float | None:
    v = row.get(key)
    if v is None:
        if required:
            raise ValueError(f"{where}.{key}: missing (a price in $/instance-hour is required)")
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (required and v == 0):
        raise ValueError(f"{where}.{key}: must be a {'positive' if required else 'non-negative'} number "
                         f"of $/instance-hour, got {v!r}")
    return float(v)


def parse_prices(data, path: str) -> PriceTable:
    if not isinstance(data, dict) or not isinstance(data.get("instances"), list) or not data["instances"]:
        raise ValueError(f"{path}: a price table needs a non-empty `instances:` list")
    out, names = [], set()
    for i, row in enumerate(data["instances"]):
        where = f"{path}: instances[{i}]"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: must be a mapping, got {row!r}")
        name, accel = row.get("name"), row.get("accelerator")
        if not name or not isinstance(name, str):
            raise ValueError(f"{where}.name: missing")
        where = f"{path}: instance {name!r}"
        if name in names:
            raise ValueError(f"{where}: listed twice")
        names.add(name)
        if not accel or not isinstance(accel, str):
            raise ValueError(f"{where}.accelerator: missing (a GPU name such as H100, or cpu)")
        key = "vcpus" if accel.lower() == "cpu" else "accelerators"
        units = row.get(key)
        if isinstance(units, bool) or not isinstance(units, int) or units < 1:
            raise ValueError(f"{where}.{key}: must be an integer >= 1, got {units!r}")
        unknown = set(row) - {"name", "accelerator", "accelerators", "vcpus", "on_demand", "spot", "source", "as_of",
                              "note"}
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}")
        out.append(InstancePrice(name, accel, units, _number(row, "on_demand", where, True),
                                 _number(row, "spot", where, False), str(row.get("source") or ""),
                                 str(row.get("as_of") or "")))
    return PriceTable(path, str(data.get("currency") or "USD"), tuple(out))


def load_prices(path: str, storage: StorageConfig | None = None) -> PriceTable:
    try:
        raw = storage_io.read_bytes(storage or StorageConfig(), path)
    except FileNotFoundError:
        raise FileNotFoundError(f"prices.path: no price table at {path}") from None
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not YAML: {str(e).splitlines()[0]}") from None
    return parse_prices(data, path)
