"""The cost surface: measured seconds of a forward at (batch width w, query width q), and of a draft pass.

Whether a draft pays depends on what a verify pass over ``q = k + 1`` new tokens costs against a
plain step (``q = 1``) at the width the engine runs, and on what a draft pass costs. Both depend
on the device: on the 2-core CPU a q=4 verify costs 1.3x a step at width 1 and 1.8x at width 8;
on a GPU at small width it is nearly free. So they are measured, not assumed:

- ``conflayers.costs.calibrate.calibrate(engine, widths, qs)`` times forwards on a synthetic cache of ``context`` tokens at
  each (w, q) on the grid (from width 16 on only q = 1, 2, 5; the rest is interpolated), and a forward with half the layers skipped at each w (that gives the
  fixed share of a step, embedding + LM head + overhead, that a layer-skip draft pass still pays);
  a few seconds on the CPU for widths up to 64;
- ``seconds(w, q)`` interpolates (linear in q, in log2 w between measured widths; outside the grid
  the nearest width scaled by w, q extrapolated linearly); ``draft_seconds(w, layers_run)`` is
  ``seconds(w, 1) * (fixed + (1 - fixed) * layers_run / L)``;
- ``observe(w, q, seconds)`` refines the surface online from the engine's own step timings:
  correction factors (exponential averages of measured / predicted) per (width, q) cell and per
  width (for cells not observed yet), and a multi-token factor (per width, and pooled over widths)
  for verify cells not observed yet, so the surface follows the real context length, load and
  verify shapes, which the calibration cannot know;
- ``conflayers.costs.calibrate.load_or_calibrate`` caches the table in JSON keyed by model, device, dtype, kernel plan and
  threads (``$CONFLAYERS_CACHE/costs.json``, default ``~/.cache/conflayers``; or a path given,
  e.g. next to a skip-set registry).

``python -m conflayers.costs.calibrate`` prints the table and draws it as a heatmap.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

from .width import engine_key

DEFAULT_WIDTHS = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_QS = (1, 2, 3, 5, 9)
WIDE = 16  # from this width on only q = 1, 2, 5 are timed (long verifies at width cost seconds each)


def timed_qs(w: int, qs) -> list[int]:
    """The query widths calibration times at width ``w`` (the others are interpolated)."""
    return sorted({q for q in qs if w < WIDE or q in (2, 5)} | {1})


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens a verify step commits for a chain draft of ``k`` tokens, each accepted with probability
    ``alpha`` until the first rejection (ALGORITHM.md §9): ``(1 - alpha^(k+1)) / (1 - alpha)``."""
    if k <= 0:
        return 1.0
    if alpha >= 1.0:
        return k + 1.0
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


@dataclass
class CostSurface:
    """``table[w][q]``: seconds of one forward of ``q`` new tokens for ``w`` rows; ``fixed[w]``: the share
    of a q=1 forward that does not scale with the layers run. ``n_layers``: the model's L."""

    table: dict[int, dict[int, float]]
    n_layers: int
    fixed: dict[int, float] = field(default_factory=dict)
    context: int = 0
    key: str = ""
    smoothing: float = 0.1  # weight of one observation in the online correction
    correction: dict = field(default_factory=dict)  # measured / predicted, per (width, q) and per width
    observations: int = 0
    prefill: float = 0.0  # seconds per prompt token of a prefill forward; 0 = not measured ...
    prefill_fixed: float = 0.0  # ... plus these seconds per forward (launches, the LM head: all a GPU pays for a small one)
    device: str = ""  # cpu | cuda (the kind of device it was measured on; "" = not recorded)
    step_overhead: float = 0.0  # seconds the engine's loop adds to each decode step's forward (0 = not measured) ...
    row_overhead: float = 0.0  # ... plus these seconds per row in the step (its per-row Python work)
    bucketed: bool = False  # measured on static steps: a step of w rows costs what its bucket (next power of 2) does

    def __post_init__(self):
        self.table = {int(w): {int(q): float(s) for q, s in row.items()} for w, row in self.table.items()}
        self.fixed = {int(w): float(f) for w, f in self.fixed.items()}
        bad = [(w, q) for w, row in self.table.items() for q, s in row.items() if not (s > 0 and math.isfinite(s))]
        if not self.table or any(1 not in row for row in self.table.values()) or bad:
            raise ValueError("a cost surface needs positive seconds at q=1 for every width it holds"
                             + (f"; bad cells {bad[:3]}" if bad else ""))
        self.widths = sorted(self.table)

    # -- prediction ----------------------------------------------------------------------------
    def _row_seconds(self, w: int, q: int) -> float:
        row = self.table[w]
        qs = sorted(row)
        if q in row:
            s = row[q]
        elif len(qs) == 1:
            s = row[qs[0]] * q / qs[0]
        else:
            i = min(max(bisect.bisect_left(qs, q), 1), len(qs) - 1)  # the segment around q (or the last one)
            q0, q1 = qs[i - 1], qs[i]
            s = row[q0] + (row[q1] - row[q0]) * (q - q0) / (q1 - q0)
        return s * self._factor(w, q)

    def _factor(self, w: int, q: int) -> float:
        """The online correction of a measured width: the cell's own once it has been observed; else
        the width's (learned from every observation at that width), and for a multi-token pass
        times how much dearer multi-token passes have turned out than the width's steps suggest
        (learned at that width, else at any width: long contexts make verify passes dearer than
        the calibration's, and a controller must not keep choosing them at a width it has not
        observed yet)."""
        if (w, q) in self.correction:
            return self.correction[(w, q)]
        c = self.correction.get(w, 1.0)
        if q > 1:
            c *= self.correction.get((w, "multi"), self.correction.get("multi", 1.0))
        return c

    def _around(self, w: int) -> tuple[int, int, float]:
        """The measured widths around ``w`` and the interpolation weight in log2 w."""
        ws = self.widths
        if w <= ws[0]:
            return ws[0], ws[0], 0.0
        if w >= ws[-1]:
            return ws[-1], ws[-1], 0.0
        i = bisect.bisect_left(ws, w)
        w0, w1 = ws[i - 1], ws[i]
        if w1 == w:
            return w, w, 0.0
        return w0, w1, (math.log2(w) - math.log2(w0)) / (math.log2(w1) - math.log2(w0))

    def _width(self, w: int) -> int:
        """The rows a step of ``w`` rows runs: ``w``, or on static steps its bucket (the next power of 2)."""
        w = max(1, int(w))
        return 1 << (w - 1).bit_length() if self.bucketed else w

    def seconds(self, w: int, q: int = 1) -> float:
        """Predicted seconds of one forward of ``q`` new tokens for ``w`` rows."""
        w, q = self._width(w), max(1, int(q))
        w0, w1, t = self._around(w)
        s = (1 - t) * self._row_seconds(w0, q) + t * self._row_seconds(w1, q)
        if w > self.widths[-1]:  # wider than measured: assume the cost scales with the rows
            s *= w / self.widths[-1]
        return s

    def fixed_share(self, w: int) -> float:
        if not self.fixed:
            return 0.2  # embedding + LM head + overhead; ALGORITHM.md §9 measured ~21% on SmolLM2
        w0, w1, t = self._around(w)
        f0, f1 = self.fixed.get(w0, 0.2), self.fixed.get(w1, 0.2)
        return min(1.0, max(0.0, (1 - t) * f0 + t * f1))

    def draft_seconds(self, w: int, layers_run: int) -> float:
        """Predicted seconds of one draft pass (q=1) running ``layers_run`` of the L layers."""
        f = self.fixed_share(w)
        return self.seconds(w, 1) * (f + (1 - f) * max(0, layers_run) / self.n_layers)

    @property
    def accelerator(self) -> str:
        """What a pipeline run on this device reports as its accelerator: ``cpu`` or the GPU's name."""
        parts = self.key.split("|")
        name = parts[4] if len(parts) > 4 else ""
        kind = self.device or ("cuda" if name.upper().startswith("NVIDIA") else "cpu")
        return name if kind == "cuda" else "cpu"

    @property
    def dtype(self) -> str:
        parts = self.key.split("|")
        return parts[3].replace("torch.", "") if len(parts) > 3 else ""

    @property
    def threads(self) -> int:
        last = self.key.rsplit("|", 1)[-1]
        return int(last[7:]) if last.startswith("threads") and last[7:].isdigit() else 0

    def prefill_seconds(self, rows: int, tokens: int) -> float:
        """Predicted seconds of a prefill forward of ``tokens`` new tokens for each of ``rows`` rows
        (logits at one column): the measured per-token cost, else the q-extrapolated surface."""
        if self.prefill > 0:
            return self.prefill_fixed + self.prefill * rows * tokens
        return self.seconds(rows, tokens)

    def plain_rate(self, w: int) -> float:
        """Tokens/s of plain decoding at width ``w``."""
        return w / self.seconds(w, 1)

    def covers(self, widths, qs) -> bool:
        """Whether the surface holds every cell a calibration over ``widths`` x ``qs`` would time."""
        return all(w in self.table and set(timed_qs(w, qs)) <= set(self.table[w]) for w in widths)

    # -- online refinement --------------------------------------------------------------------
    def observe(self, w: int, q: int, seconds: float) -> None:
        """Fold a measured forward of ``q`` tokens at width ``w`` into the corrections of the nearest
        measured width: its (width, q) cell's, the width's own, and for ``q > 1`` how much dearer
        multi-token passes are than that width's correction says (per width and over all widths)."""
        if not (seconds > 0 and math.isfinite(seconds)):
            return
        w, q = self._width(w), max(1, int(q))
        w0, w1, t = self._around(w)
        near = w0 if t < 0.5 else w1
        pred = self.seconds(w, q)
        base = pred / self._factor(near, q)  # the prediction without any correction
        ema = lambda c, r: c * (1 - self.smoothing + min(10.0, max(0.1, r / c)) * self.smoothing)  # noqa: E731
        ratio = seconds / base
        stepped = (near, 1) in self.correction  # plain steps seen at this width: they set its factor
        self.correction[(near, q)] = ema(self._factor(near, q), ratio)
        width = self.correction.get(near, 1.0)
        if q > 1:  # relative to the width's own correction
            rel = ratio / width
            self.correction[(near, "multi")] = ema(self.correction.get((near, "multi"),
                                                                      self.correction.get("multi", 1.0)), rel)
            self.correction["multi"] = ema(self.correction.get("multi", 1.0), rel)
        if q == 1 or not stepped:
            self.correction[near] = ema(width, ratio)
        self.observations += 1

    # -- (de)serialisation --------------------------------------------------------------------
    def as_dict(self) -> dict:
        return {"table": {str(w): {str(q): s for q, s in row.items()} for w, row in self.table.items()},
                "fixed": {str(w): f for w, f in self.fixed.items()}, "n_layers": self.n_layers,
                "context": self.context, "key": self.key, "prefill": self.prefill, "prefill_fixed": self.prefill_fixed,
                "device": self.device, "step_overhead": self.step_overhead, "row_overhead": self.row_overhead,
                "bucketed": self.bucketed}

    @classmethod
    def from_dict(cls, d: dict) -> "CostSurface":
        try:
            return cls(table=d["table"], n_layers=int(d["n_layers"]), fixed=d.get("fixed") or {},
                       context=int(d.get("context") or 0), key=str(d.get("key") or ""),
                       prefill=float(d.get("prefill") or 0.0), prefill_fixed=float(d.get("prefill_fixed") or 0.0), device=str(d.get("device") or ""),
                       step_overhead=float(d.get("step_overhead") or 0.0),
                       row_overhead=float(d.get("row_overhead") or 0.0), bucketed=bool(d.get("bucketed", False)))
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"not a cost surface: {e}") from None

    def text_table(self) -> str:
        qs = sorted({q for row in self.table.values() for q in row})
        head = ["width", *(f"q={q} ms" for q in qs), *(f"q={q}/q=1" for q in qs[1:]), "fixed share", "plain tok/s"]
        rows = []
        for w in self.widths:
            row = self.table[w]
            rows.append([str(w), *(f"{row[q] * 1e3:.1f}" if q in row else "-" for q in qs),
                         *(f"{row[q] / row[1]:.2f}" if q in row else "-" for q in qs[1:]),
                         f"{self.fixed[w]:.2f}" if w in self.fixed else "-", f"{w / row[1]:.1f}"])
        widths = [max(len(h), *(len(r[c]) for r in rows)) for c, h in enumerate(head)]
        lines = ["| " + " | ".join(h.ljust(n) for h, n in zip(head, widths)) + " |",
                 "|" + "|".join("-" * (n + 2) for n in widths) + "|"]
        lines += ["| " + " | ".join(v.ljust(n) for v, n in zip(r, widths)) + " |" for r in rows]
        return "\n".join(lines)


def surface_key(engine) -> str:
    return engine_key(engine)
