"""Layer plans on unmodified transformers decoders.

A *draft pass* is the model's ordinary forward with some decoder layers bypassed. Bypassing is
done by shadowing ``forward`` on the chosen layer instances for the duration of a ``with``
block (the class, the config and every other layer stay untouched) and is undone in
``finally``, so a forward that raises leaves the model whole.

A bypassed layer returns its input hidden state unchanged: no attention, no MLP, and since
its attention never runs it writes no KV.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterable, Iterator

import torch

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layer list of a causal LM (``model.model.layers``), or a clear error."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    if not isinstance(layers, torch.nn.ModuleList) or model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported model type {model_type!r} ({type(model).__name__}): ConfLayers supports decoder-only "
            f"models of the families {', '.join(SUPPORTED_MODEL_TYPES)} whose layers are in model.model.layers"
        )
    return layers


def num_layers(model) -> int:
    return len(decoder_layers(model))


def validate_skip_set(skip: Iterable[int], n_layers: int) -> frozenset[int]:
    """A skip set may name layers 1 … L-2 only (the first and last layer always run)."""
    out = set()
    for i in skip:
        try:
            i = operator.index(i)
        except TypeError:
            raise ValueError(f"skip-set entry {i!r} is not a layer index") from None
        if not 1 <= i <= n_layers - 2:
            raise ValueError(
                f"skip-set layer {i} is out of range: only intermediate layers 1..{n_layers - 2} of this "
                f"{n_layers}-layer model may be skipped (layer 0 and layer {n_layers - 1} always run)"
            )
        out.add(i)
    return frozenset(out)


def _bypass(hidden_states, *args, **kwargs):
    return hidden_states


@contextlib.contextmanager
def skip_layers(model, skip: Iterable[int]) -> Iterator[None]:
    """Within the block, every layer in ``skip`` passes its input through untouched."""
    layers = decoder_layers(model)
    skip = sorted(set(skip))
    if not skip:
        yield
        return
    patched = []
    try:
        for i in skip:
            layer = layers[i]
            if "forward" in layer.__dict__:
                raise RuntimeError(f"layer {i} already has a patched forward (nested skip_layers?)")
            layer.forward = _bypass
            patched.append(layer)
        yield
    finally:
        for layer in patched:
            del layer.forward


@contextlib.contextmanager
def capture_sublayers(model) -> Iterator[dict[int, dict[str, torch.Tensor]]]:
    """Capture each layer's attention-sublayer and MLP-sublayer output (before the residual add).

    Yields a dict filled during the block: ``{layer_idx: {"attn": [B, T, H], "mlp": [B, T, H]}}``
    (the last forward in the block wins). Hooks are removed on exit, also after an exception.
    """
    layers = decoder_layers(model)
    captured: dict[int, dict[str, torch.Tensor]] = {}
    handles = []

    def hook(idx: int, kind: str):
        def fn(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            captured.setdefault(idx, {})[kind] = out.detach()

        return fn

    try:
        for idx, layer in enumerate(layers):
            handles.append(layer.self_attn.register_forward_hook(hook(idx, "attn")))
            handles.append(layer.mlp.register_forward_hook(hook(idx, "mlp")))
        yield captured
    finally:
        for h in handles:
            h.remove()
