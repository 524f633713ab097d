"""Compiled steps: the decode and verify steps with each decoder layer compiled once, reused by every layer.

An eager step dispatches every small op of every decoder layer from Python (SmolLM2: 30 layers x
~25 ops); on a CPU at small widths, and on a GPU at any width, that host work is most of the step.
``CompiledSteps`` runs the same step with the decoder layer's ``forward`` compiled by
``torch.compile`` (inductor: fused C++ loops on a CPU, Triton kernels on CUDA) — regional
compilation: one compiled layer serves all layers, since the layers differ only in their weights,
which the compiled code takes as inputs. Compile time is that of one layer, not of the model.

What makes the layer compile once, with no recompiles as the step changes shape:

- **no Python state per step inside the region.** The compiled layer never sees the engine's
  ``Cache`` object (whose slot ranges and read lengths change every step): the model is called with
  ``cache=None`` and the keys and values are written and read by ``slot_attention``, the attention
  function the model runs while steps are compiled. Each layer gets its slot storage as an argument
  (bound before the step, unbound after: storage is an input like any other, of dynamic shape, not
  a module attribute, which dynamo would take as static), writes each row's new keys and values at
  the row's positions (``position_ids``), and attends over the first ``C`` columns of the decode
  rows' slots, ``C`` the mask's width. The write positions, the rows and ``C`` are all tensor
  inputs or their shapes;
- **dynamic shapes**: rows, query length, columns and the storage's size are symbolic, each its own
  symbol (no "duck" shapes: a width that happens to equal the slot count, or a column count equal
  to the hidden size, must not tie the two). PyTorch still specialises sizes 0 and 1, so a layer
  compiles four times: rows 1 or more, q 1 or more (plain decoding at width 1 is the
  matrix-vector case, worth its own code). The probes that compile them have more slots than rows,
  so the storage's size is never compiled in as a 1;
- **no guard check per call**: each variant is compiled ahead of time (``aot_compile``) and called
  with its guards off. Dynamo's per-call guard check and frame handling cost ~0.17 ms a layer call on
  this project's CPU, about what the fused kernels save: with 30 layers a step that is as much as the
  whole gain. The variant is picked here from the rows and tokens, and the layers are checked to be
  alike (``_layer_signature``: one whose attributes differ, say a sliding-window layer among global
  ones, fails the compile instead of running another layer's code);
- **the kernel plan's linears**: on the ``onednn`` plan the compiled layer calls the prepacked oneDNN
  kernels (``conflayers::packed_linear``, see ``conflayers.kernels``); on ``native`` inductor lowers
  the linears itself. The linears are most of a small-width step on a CPU (the weights stream from
  memory), so compiled steps win only on the plan that is fastest eagerly.

Prefill chunks and layer-skip draft passes stay eager (a prefill is one call per chunk; a draft pass
bypasses layers, a different program), through the same ``KVState`` storage.

``prepare()`` compiles all four variants at once (bounded, logged), checks the compiled step against
the eager one on a probe, and falls back to eager with one warning naming the cause if anything fails
(no C++ compiler, an op inductor cannot lower, a mismatch). Without guards, the compiled code checks
its inputs' sizes and strides (inductor's asserts) and nothing else: a step whose inputs it cannot
take raises, and is rerun eagerly, as is every later one, with one warning; what sizes do not show
(dtype, hooks added later, the training flag) is assumed unchanged after ``prepare``. Inductor's caches live under
``$CONFLAYERS_CACHE/inductor`` (``TORCHINDUCTOR_CACHE_DIR``), so a second start on the machine
reuses the compiled kernels.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_cache_dir
from torch._inductor.runtime.cache_dir_utils import default_cache_dir
from torch.fx.experimental import _config as _shape_config
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .kernels import current_plan
from .layers import decoder_layers

log = logging.getLogger(__name__)

NAME = "conflayers_slot_attention"
COMPILE = ("auto", "on", "off")
_KV = "conflayers_slot_kv"  # the layer kwarg that carries its slot storage (keys, values) into a compiled step
_BASE = "_conflayers_base_attention"  # on each attention module: the attention function it ran before


def cache_dir() -> str:
    """``$CONFLAYERS_CACHE/inductor`` (default ``~/.cache/conflayers/inductor``)."""
    base = os.environ.get("CONFLAYERS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "conflayers")
    return os.path.join(base, "inductor")


def slot_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """The model's attention while steps are compiled: inside a compiled step (the layer's slot storage
    passed as ``conflayers_slot_kv``), write the new keys/values into it and attend over the decode
    rows' first ``C`` columns (``C`` the mask's width); otherwise exactly the attention the model ran
    before."""
    slot_kv = kwargs.pop(_KV, None)
    if slot_kv is None:
        return getattr(module, _BASE)(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    ks, vs = slot_kv
    pos = kwargs["position_ids"]  # [B, q]: each new token's column in its row's slot
    b, h, q, d = query.shape
    rows = torch.arange(b, device=pos.device)[:, None].expand_as(pos)
    ks[rows, :, pos] = key.transpose(1, 2)
    vs[rows, :, pos] = value.transpose(1, 2)
    c = attention_mask.shape[-1]
    key, value = ks[:b, :, :c], vs[:b, :, :c]
    # grouped-query attention without copying the cache: the query heads that share a key/value head
    # are stacked along the query axis (as conflayers.attention.packed_sdpa), for every q
    n_rep = h // key.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(b, h // n_rep, n_rep * q, d), key, value, attn_mask=attention_mask.repeat(1, 1, n_rep, 1),
        scale=scaling)
    return out.reshape(b, h, q, value.shape[-1]).transpose(1, 2).contiguous(), None


def slot_attention_mask(*args, config=None, **kwargs):
    """The masks the model makes for itself under ``slot_attention`` (``generate`` on the same model, a
    padded batch): the ones its attention made before the switch. Compiled steps pass their own."""
    base = getattr(config, "_conflayers_base_attention", None)
    if base not in ALL_MASK_ATTENTION_FUNCTIONS:  # what transformers gives an attention with no mask maker
        return None
    return ALL_MASK_ATTENTION_FUNCTIONS[base](*args, config=config, **kwargs)


AttentionInterface.register(NAME, slot_attention)
AttentionMaskInterface.register(NAME, slot_attention_mask)
# inductor's on-disk caches beside the project's others, unless the user chose a place (importing torch
# already filled in inductor's default, /tmp/torchinductor_<user>, which is cleared on reboot)
if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, os.path.abspath(default_cache_dir())):
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir()


def _base_attention(model):
    """The attention function the model runs now (the registered one, or its family's eager one)."""
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl in ALL_ATTENTION_FUNCTIONS:
        return impl, ALL_ATTENTION_FUNCTIONS[impl]
    layer = decoder_layers(model)[0]
    return impl, sys.modules[type(layer.self_attn).__module__].eager_attention_forward


def use_slot_attention(model) -> str:
    """Switch the model to ``slot_attention`` (in place; a pass-through outside compiled steps);
    returns the attention implementation it ran before."""
    current = getattr(model.config, "_attn_implementation", None)
    if current == NAME:
        return model.config._conflayers_base_attention
    impl, fn = _base_attention(model)
    for layer in decoder_layers(model):
        attn = layer.self_attn
        attn.__dict__[_BASE] = fn
    model.config._conflayers_base_attention = impl
    model.set_attn_implementation(NAME)
    return impl


def base_attention(model) -> str:
    """The attention implementation under ``slot_attention`` (or the one in effect)."""
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    return model.config._conflayers_base_attention if impl == NAME else impl


class CompileError(RuntimeError):
    pass


def _variant(rows: int, q: int) -> tuple[bool, bool]:
    return rows > 1, q > 1


def _layer_signature(layer) -> dict:
    """The plain attributes (numbers, strings, flags) of a decoder layer and its submodules, but its
    index: what the compiled layer specialises on, so every layer must share it to share the code."""
    sig = {}
    for name, module in layer.named_modules():
        for key, value in vars(module).items():
            if key.startswith("_") or key == "layer_idx" or not isinstance(value, (bool, int, float, str, type(None), tuple)):
                continue
            sig[f"{name}.{key}" if name else key] = value
    return sig


class CompiledSteps:
    """Decode/verify steps over a ``KVState``'s decode rows with compiled decoder layers.

    ``forward(kv, tokens)`` is ``kv.forward(tokens)`` for the decode rows (the tokens' keys and
    values pending in the cache afterwards). Build with ``CompiledSteps(model)``, then ``prepare()``
    once (compiles; raises ``CompileError`` naming the cause)."""

    def __init__(self, model):
        self.model = model
        self.layers = list(decoder_layers(model))
        first = _layer_signature(self.layers[0])
        for i, layer in enumerate(self.layers[1:], 1):
            sig = _layer_signature(layer)
            if sig != first:
                diff = sorted(k for k in first.keys() | sig.keys() if first.get(k) != sig.get(k))
                raise CompileError(f"decoder layer {i} differs from layer 0 in {', '.join(diff[:4])}: "
                                   "one compiled layer cannot serve both")
        use_slot_attention(model)
        self.kernels = current_plan(model).name  # the compiled layers call this plan's linears
        self._variants: dict[tuple[bool, bool], object] = {}  # (rows > 1, q > 1) -> compiled layer forward
        self._capture: dict | None = None
        self.compile_seconds: float | None = None
        self.failed: str | None = None  # why a compiled step failed mid-run (steps are eager from then on)

    def _layer_forward(self, layer, hidden_states, *args, **kwargs):
        """What each decoder layer runs during a compiled step: its variant's compiled code; while
        preparing, the eager layer, whose arguments are kept to compile the missing variant from."""
        fn = self._variants.get(_variant(*hidden_states.shape[:2]))
        if fn is not None:
            return fn(layer, hidden_states, *args, **kwargs)
        if self._capture is None:
            raise RuntimeError(f"no compiled variant for {tuple(hidden_states.shape[:2])} (rows, tokens)")
        self._capture.setdefault("args", ((layer, hidden_states, *args), kwargs))
        return type(layer).forward(layer, hidden_states, *args, **kwargs)

    @contextmanager
    def _bound(self, kv):
        """The decoder layers run compiled, on ``kv``'s storage, for the block."""
        for layer, slot in zip(self.layers, kv.layers):
            layer.forward = functools.partial(self._layer_forward, layer, **{_KV: (slot.keys, slot.values)})
        try:
            yield
        finally:
            for layer in self.layers:
                layer.__dict__.pop("forward", None)

    def _run(self, kv, tokens: torch.Tensor) -> torch.Tensor:
        b, q = tokens.shape
        offsets = kv.lengths[:b] + kv.pending
        positions = offsets[:, None] + torch.arange(q, device=tokens.device)[None, :]
        kv_len = int(offsets.max()) + q
        kv.ensure_columns(kv_len)
        mask = kv.attention_mask(positions, kv_len)
        with self._bound(kv):
            logits = self.model(input_ids=tokens, attention_mask=mask, position_ids=positions, use_cache=False).logits
        kv.pending += q
        return logits

    def forward(self, kv, tokens: torch.Tensor) -> torch.Tensor:
        b, q = tokens.shape
        if b != kv.n:
            raise ValueError(f"{b} token rows for {kv.n} decode rows")
        if self.failed or not kv.layers[0].is_initialized:  # nothing prefilled yet: the eager path allocates
            return kv.forward(tokens)
        pending = kv.pending
        try:
            return self._run(kv, tokens)
        except Exception as e:  # a shape it cannot run, say: this step and every later one run eagerly
            if self.compile_seconds is None:
                raise  # while preparing: prepare() reports it
            self.failed = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
            log.warning("a compiled step failed (%s): decoding eagerly from here", self.failed)
            kv.pending = pending
            return kv.forward(tokens)  # what it wrote is rewritten at the same columns

    def _compile_variant(self, kv, tokens: torch.Tensor, reuse: bool = True) -> tuple[str, bool]:
        """Compile the layer for ``tokens``' variant: run the step eagerly once to see the arguments the
        model passes its layers, then compile ``forward`` for them ahead of time. Each variant's guards
        are not checked per call (``disable_guard_check``): which variant runs is chosen here, by the
        rows and tokens, and the layers are checked to share everything else (``_layer_signature``);
        dynamo's per-call guard check would cost more than the fused kernels save. With ``reuse``, a
        variant saved by an earlier process is read back instead. Returns (where it is saved, whether it
        was read back)."""
        self._capture = {}
        try:
            self._run(kv, tokens)
        finally:
            kv.rollback()
            captured, self._capture = self._capture.get("args"), None
        args, kwargs = captured
        variant = _variant(*tokens.shape)
        path = self._artifact(variant, args[1].dtype, args[1].device)
        compiled = _load(path, type(self.layers[0]).forward) if reuse else None
        if compiled is None:
            fn = torch.compile(type(self.layers[0]).forward, dynamic=True, fullgraph=True)
            with torch._dynamo.config.patch(specialize_float=True), _shape_config.patch(use_duck_shape=False):
                compiled = fn.aot_compile((args, kwargs))
        compiled.disable_guard_check()
        self._variants[variant] = compiled
        return path, getattr(compiled, "loaded", False)

    def _artifact(self, variant: tuple[bool, bool], dtype: torch.dtype, device: torch.device) -> str:
        """Where a variant's compiled layer is kept between processes: named by everything it was
        compiled from (torch and transformers versions, the layer's code, attributes, submodule classes
        and parameter shapes, the model's config, dtype, device, the CPU's vector instructions, kernel
        plan, the attention under ``slot_attention`` (its mask's kind), variant, and this project's code
        that is traced into it)."""
        import transformers

        layer = self.layers[0]
        layer_cls = type(layer)
        modules = [(name, type(m).__qualname__) for name, m in layer.named_modules()]
        params = [(name, tuple(p.shape), str(p.dtype)) for name, p in layer.named_parameters()]
        biases = [name for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear) and m.bias is None]
        isa = ""
        if device.type == "cpu":
            from torch._inductor.cpu_vec_isa import pick_vec_isa

            isa = str(pick_vec_isa())
        h = hashlib.sha256()
        for part in (torch.__version__, transformers.__version__, layer_cls.__module__, layer_cls.__qualname__,
                     repr(sorted(_layer_signature(layer).items())), repr(modules), repr(params), repr(biases),
                     _config_text(self.model.config), str(dtype), str(device), isa, self.kernels,
                     base_attention(self.model), repr(variant)):
            h.update(part.encode())
        for mod in (sys.modules[layer_cls.__module__], sys.modules[__name__], sys.modules[current_plan.__module__]):
            h.update(Path(mod.__file__).read_bytes())
        return os.path.join(inductor_cache_dir(), "conflayers-steps", h.hexdigest()[:32] + ".bin")

    def prepare(self, make_kv, widths=(1, 2), qs=(1, 2)) -> float:
        """Compile every variant (rows 1 / several, q 1 / several) on probe caches from ``make_kv(slots)``
        (``slots`` decode rows of a short context) and check each compiled step against the eager step;
        returns the seconds it took."""
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                for w in widths:
                    for q in qs:
                        # more slots than decode rows, never 1: the storage's slot count must stay symbolic
                        # (a size of 1 would be compiled in as a constant)
                        kv = make_kv(w + 2)
                        kv.n = w
                        tokens = torch.arange(1, 1 + w * q, device=kv.device).reshape(w, q) % 7 + 1
                        path, loaded = self._compile_variant(kv, tokens)
                        try:
                            self._check(kv, tokens)
                        except Exception as e:
                            if not loaded:
                                raise
                            # a saved variant that does not hold here (another CPU's code, say): compile anew
                            log.info("saved compiled layer %s failed its check (%s): compiling it again", path, e)
                            _remove(path)
                            self._compile_variant(kv, tokens, reuse=False)
                            self._check(kv, tokens)
                            loaded = False
                        if not loaded:  # saved only once checked
                            _save(self._variants[_variant(w, q)], path, type(self.layers[0]).forward)
        except CompileError:
            raise
        except Exception as e:  # inductor's and dynamo's failures are of many kinds: each means "stay eager"
            msg = str(e).strip().splitlines()
            raise CompileError(f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]) from e
        self.compile_seconds = time.perf_counter() - t0
        return self.compile_seconds

    def _check(self, kv, tokens: torch.Tensor) -> None:
        """The compiled step computes what the eager one does (a fused kernel sums in another order: not
        bit for bit), relative to the values' scale; ``CompileError`` if not."""
        w, q = tokens.shape
        got = self._run(kv, tokens)
        got_kv = _written(kv, w, q)
        kv.rollback()
        want = kv.forward(tokens)
        want_kv = _written(kv, w, q)
        kv.rollback()
        tol = 1e-3 if kv.dtype in (torch.float32, torch.float64) else 5e-2
        for what, a, b in (("logits", got, want), ("cached keys", got_kv, want_kv)):
            err = (a.double() - b.double()).abs().max().item()
            scale = 1.0 + b.double().abs().max().item()
            if not err <= tol * scale:
                raise CompileError(f"the compiled step's {what} differ from the eager step's by {err:.3g} "
                                   f"(rows {w}, q {q})")


def _functions(fn) -> dict:
    """``fn`` and the functions it wraps (a decorated layer forward), by name: the compiled layer refers
    to them, and they are not pickled but named (the loading process has its own)."""
    out, i = {}, 0
    while fn is not None:
        out[f"fn{i}"] = fn
        fn, i = getattr(fn, "__wrapped__", None), i + 1
    return out


def _load(path: str, forward):
    """A compiled layer saved by an earlier process, or None (none saved, or it cannot be read back)."""
    if not os.path.exists(path):
        return None
    try:
        from torch._dynamo.aot_compile import AOTCompiledFunction

        class Unguarded(AOTCompiledFunction):
            """Read back without its guards: they are never checked here (the variant is chosen by
            ``CompiledSteps``), and some guard state (module trees) is not saved with the code."""

            def __post_init__(self) -> None:
                self._artifacts.check_compatibility()
                self.fn = self._artifacts.runtime_env.forward_callable(
                    self._artifacts.backend_id, self._artifacts.compiled_fn, extra_globals=self._extra_globals)

            def __call__(self, *args, **kwargs):
                return self.fn(*args, **kwargs)

            def disable_guard_check(self) -> None:
                pass

        with open(path, "rb") as f:
            loaded = Unguarded.deserialize(f.read(), f_globals=forward.__globals__,
                                                   external_closure_data=_functions(forward))
        loaded.loaded = True
        return loaded
    except Exception as e:  # another torch's format, a truncated file: compile anew (and overwrite it)
        log.info("compiled layer %s not reused (%s: %s)", path, type(e).__name__, str(e)[:200])
        return None


def _config_text(config) -> str:
    try:
        return config.to_json_string(use_diff=False)
    except Exception:  # an attribute JSON cannot hold
        return repr(sorted((k, repr(v)) for k, v in vars(config).items()))


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _save(compiled, path: str, forward) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        compiled.save_compiled_function(path, external_data=_functions(forward))  # written to a temporary file and renamed
    except Exception as e:  # not saved: the next start compiles again (inductor's own caches still help)
        log.info("compiled layer not saved (%s: %s)", type(e).__name__, str(e)[:200])


def _written(kv, rows: int, q: int) -> torch.Tensor:
    """The keys a step of ``q`` tokens just wrote for ``rows`` decode rows, first and last layer."""
    out = []
    for layer in (kv.layers[0], kv.layers[-1]):
        for b in range(rows):
            start = int(kv.lengths[b])
            out.append(layer.keys[b, :, start : start + q].clone())
    return torch.stack(out)
