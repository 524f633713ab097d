"""``max_batch: auto``: measured throughput against width, within the KV budget, cached."""

import json

import pytest
import torch

from conflayers import Engine
from conflayers.costs.width import choose_width

from .conftest import tiny_model


@pytest.fixture(scope="module")
def engine(one_thread):
    return Engine(tiny_model("llama", dtype=torch.float32))


def test_choose_width_measures_fitting_widths_and_caches_them(engine, tmp_path):
    cache = tmp_path / "widths.json"
    budget = 8 * 100 * engine.bytes_per_token  # 8 rows of 100 positions
    c = choose_width(engine, kv_budget_bytes=budget, row_tokens=100, max_width=64, cache_file=cache)
    assert sorted(c.tokens_per_s) == [1, 2, 4, 8] and c.max_fitting == 8 and not c.cached
    assert all(v > 0 for v in c.tokens_per_s.values())
    best = max(c.tokens_per_s.values())
    assert c.tokens_per_s[c.width] >= 0.95 * best  # within the tolerance of the best ...
    assert all(v < 0.95 * best for w, v in c.tokens_per_s.items() if w < c.width)  # ... and the narrowest such
    (key, table), = json.loads(cache.read_text()).items()
    assert "float32" in key and sorted(map(int, table)) == [1, 2, 4, 8]
    again = choose_width(engine, kv_budget_bytes=budget, row_tokens=100, max_width=64, cache_file=cache)
    assert again.cached and again.tokens_per_s == c.tokens_per_s and again.width == c.width
    wider = choose_width(engine, kv_budget_bytes=2 * budget, row_tokens=100, max_width=64, cache_file=cache)
    assert not wider.cached and sorted(wider.tokens_per_s) == [1, 2, 4, 8, 16]  # only 16 was measured anew


def test_a_budget_that_fits_no_row_is_refused(engine, tmp_path):
    with pytest.raises(ValueError, match="not even one row of 512 KV positions fits the KV budget"):
        choose_width(engine, kv_budget_bytes=1000, row_tokens=512, cache_file=tmp_path / "w.json")
