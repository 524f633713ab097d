"""Kernel plans: which kernels the model's linear layers run on.

PyTorch's default fp32 ``nn.Linear`` on CPU goes to MKL, whose matrix-matrix path is slow for the
2-64 rows that batched decoding and multi-token verification feed it (and MKL picks weak code paths
on AMD CPUs). The ``onednn`` plan packs every linear weight once into oneDNN's blocked layout
(``mkldnn::_reorder_linear_weight``) and runs the layer through ``mkldnn::_linear_pointwise``:

- it is applied as an *instance* ``forward`` on each ``nn.Linear`` (the model classes are never
  touched), so layer skipping (which shadows decoder-layer forwards) and the sublayer capture hooks
  compose with it unchanged;
- the dense weight of a packed layer is released (its parameter keeps dtype and device, holds no
  storage), so resident memory does not grow; a weight shared with another module (the LM head tied
  to the token embedding) stays dense for that module and the head gets a packed copy of its own,
  which ``KernelPlan.extra_bytes`` reports;
- ``restore_native(model)`` unpacks the weights back into dense parameters;
- inside a compiled step (``conflayers.compiled``) a packed layer runs the same kernel as the
  custom op ``conflayers::packed_linear``: inductor cannot take oneDNN's opaque packed tensor as a
  graph input (its own oneDNN lowering needs weights frozen into constants, one compile per layer),
  so the graph takes the layer's ``weight`` parameter, whose ``_conflayers_packed`` attribute holds
  the packed copy the op runs on. One compiled decoder layer thus serves every layer on prepacked
  weights, and a new packing (the plan reapplied) needs no new compile.

``auto`` picks the fastest known path for the device and dtype: ``onednn`` for float32 / bfloat16 on
a CPU with oneDNN, else ``native`` (CUDA keeps its default path; oneDNN has no float64 kernels).
Measured in ``benchmarks/kernel_bench.py``; the table is in ``docs/benchmarks/kernels``.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass

import torch

KERNELS = ("auto", "native", "onednn")
ONEDNN_DTYPES = (torch.float32, torch.bfloat16)

_PACKED = "_conflayers_packed"  # on a packed nn.Linear: (packed weight, dense shape, weight is shared)
_PLAN = "_conflayers_kernel_plan"  # on the model: the KernelPlan in effect


@dataclass(frozen=True)
class KernelPlan:
    name: str  # the plan in effect: "native" or "onednn"
    requested: str  # what was asked for: "auto", "native" or "onednn"
    reason: str  # why this plan (one line, for logs and stats)
    linears: int = 0  # linear layers running on the plan's kernels
    extra_bytes: int = 0  # resident bytes the plan added (packed copies of shared weights)

    def as_dict(self) -> dict:
        return {
            "kernels": self.name,
            "requested": self.requested,
            "reason": self.reason,
            "linears": self.linears,
            "extra_bytes": self.extra_bytes,
        }


def _model_dtype_device(model) -> tuple[torch.dtype, torch.device]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    raise ValueError("the model has no floating-point parameters")


def choose(model, kernels: str = "auto") -> tuple[str, str]:
    """(plan name, reason) for ``kernels`` on this model's device and dtype; ``ValueError`` if impossible."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
    if kernels == "native":
        return "native", "requested"
    dtype, device = _model_dtype_device(model)
    why_not = None
    if device.type != "cpu":
        why_not = f"the model is on {device.type} (the oneDNN plan is for CPUs; CUDA keeps its default kernels)"
    elif dtype not in ONEDNN_DTYPES:
        why_not = f"oneDNN has no {str(dtype).removeprefix('torch.')} linear kernels"
    elif not torch.backends.mkldnn.is_available():
        why_not = "this PyTorch build has no oneDNN"
    elif not _onednn_runs(dtype):
        why_not = f"this CPU lacks oneDNN's {str(dtype).removeprefix('torch.')} instructions (e.g. avx512bw/vl/dq)"
    if why_not is None:
        return "onednn", "prepacked oneDNN linears (the fastest measured CPU path)"
    if kernels == "onednn":
        raise ValueError(f"kernels='onednn' is not possible here: {why_not}")
    return "native", why_not


@functools.lru_cache(maxsize=None)
def _onednn_runs(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs and runs a linear of ``dtype`` on this CPU (bf16 needs AVX-512 or AMX)."""
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(8, 8, dtype=dtype), None)
        torch.ops.mkldnn._linear_pointwise(torch.ones(2, 8, dtype=dtype), w, None, "none", [], "")
        return True
    except RuntimeError:
        return False


_WEIGHT_PACKED = "_conflayers_packed_copy"  # on a packed layer's weight parameter: the packed copy

_LIB = torch.library.Library("conflayers", "FRAGMENT")
_LIB.define("packed_linear(Tensor x, Tensor weight, Tensor? bias, SymInt out_features) -> Tensor")


def _packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    packed = getattr(weight, _WEIGHT_PACKED, None)
    if packed is None:
        raise RuntimeError("conflayers::packed_linear got a weight with no packed copy (the oneDNN plan is not "
                           "in effect on this layer)")
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


_LIB.impl("packed_linear", _packed_linear, "CPU")


@torch.library.register_fake("conflayers::packed_linear")
def _packed_linear_fake(x, weight, bias, out_features):
    return x.new_empty((*x.shape[:-1], out_features))


def _onednn_forward(module: torch.nn.Linear, packed: torch.Tensor):
    """The packed layer's forward: the oneDNN kernel called directly, or, while ``torch.compile`` traces
    it, the same kernel as ``conflayers::packed_linear`` on the layer's weight parameter."""
    op = torch.ops.mkldnn._linear_pointwise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return torch.ops.conflayers.packed_linear(x, self.weight, self.bias, self.out_features)
        bias = self.bias
        return op(x, packed, None if bias is None else bias.detach(), "none", [], "")

    return types.MethodType(forward, module)


def _shared_weight_ids(model) -> set[int]:
    """Ids of parameters that more than one module holds (tied weights)."""
    seen: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            seen[id(p)] = seen.get(id(p), 0) + 1
    return {pid for pid, n in seen.items() if n > 1}


def is_packed(module: torch.nn.Module) -> bool:
    return _PACKED in module.__dict__


def apply_kernels(model, kernels: str = "auto") -> KernelPlan:
    """Put ``model`` on the kernel plan ``kernels`` (``auto`` / ``native`` / ``onednn``), in place."""
    name, reason = choose(model, kernels)
    current = current_plan(model)
    if current.name == name:  # already there (a second Engine on the same model): nothing to redo
        return current
    restore_native(model)
    if name == "native":
        return KernelPlan("native", kernels, reason)
    shared = _shared_weight_ids(model)
    count, extra = 0, 0
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, torch.nn.Linear) or "forward" in module.__dict__:
                continue
            weight = module.weight
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
            module.forward = _onednn_forward(module, packed)
            module.__dict__[_PACKED] = (packed, tuple(weight.shape), id(weight) in shared)
            setattr(weight, _WEIGHT_PACKED, packed)
            if id(weight) in shared:
                extra += weight.numel() * weight.element_size()
            else:  # release the dense copy: the packed one is all the forward reads
                weight.data = weight.data.new_empty(0)
            count += 1
        # Weights loaded from safetensors are views of one memory-mapped file, which stays mapped
        # (and resident) while any of them lives: copying the few kept tensors (embedding, norms)
        # out of it lets the released weights' pages go.
        for t in [*model.parameters(), *model.buffers()]:
            if t.numel() and t.device.type == "cpu":
                t.data = t.data.clone()
    plan = KernelPlan("onednn", kernels, reason, linears=count, extra_bytes=extra)
    model.__dict__[_PLAN] = plan
    return plan


def current_plan(model) -> KernelPlan:
    """The plan ``apply_kernels`` put the model on (``native`` if none)."""
    return model.__dict__.get(_PLAN) or KernelPlan("native", "native", "default PyTorch kernels")


def restore_native(model) -> None:
    """Undo ``apply_kernels``: every packed linear gets its dense weight and default forward back."""
    model.__dict__.pop(_PLAN, None)
    with torch.no_grad():
        for module in model.modules():
            entry = module.__dict__.pop(_PACKED, None)
            if entry is None:
                continue
            packed, shape, shared = entry
            if getattr(module.weight, _WEIGHT_PACKED, None) is packed:
                delattr(module.weight, _WEIGHT_PACKED)
            if not shared:
                module.weight.data = packed.to_dense().reshape(shape).to(module.weight.dtype)
            del module.forward
