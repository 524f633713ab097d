"""The skip rule, the λ controller and layer confidence (ALGORITHM.md §3–§5)."""

import numpy as np
import pytest
import torch

from conflayers.layers import capture_sublayers
from conflayers.search.confidence import (
    curvature_weights,
    layer_confidences,
    leading_run,
    skip_rule,
    sublayer_confidence,
    update_lambda,
    window_sizes,
)

from .conftest import tiny_model


def test_clear_dip_is_skipped():
    c = np.full(12, 1.0)
    c[5] = 0.2  # layer 6
    rule = skip_rule(c, 0.0)
    assert 6 in rule.layers
    assert rule.z[5] < rule.thresholds[5]


def test_flat_curve_skips_nothing():
    rule = skip_rule(np.full(10, 0.7), 0.0)
    assert rule.layers == frozenset()
    assert np.allclose(rule.g, 0.5)


@pytest.mark.parametrize("seed", range(5))
def test_raising_lambda_never_adds_layers(seed):
    c = np.random.default_rng(seed).normal(size=20)
    previous = None
    for lam in np.linspace(-1.0, 2.0, 13):
        layers = skip_rule(c, lam).layers
        if previous is not None:
            assert layers <= previous
        previous = layers


@pytest.mark.parametrize("seed", range(5))
def test_first_and_last_layer_never_chosen(seed):
    L = 16
    c = np.random.default_rng(seed).normal(size=L - 2)
    layers = skip_rule(c, -2.0, n_layers=L).layers  # very negative λ: skip as much as the rule allows
    assert layers and all(1 <= i <= L - 2 for i in layers)


def test_window_formula_hand_computed():
    # w_k = 2 + floor(alpha * g_k * (k+1) / L), L = 6, alpha = 5
    assert window_sizes(np.array([0.5, 1.0, 0.0, 0.5]), 6, 5).tolist() == [2, 3, 2, 3]
    # alpha = 10 (a leading run of 2): 2 + floor(10 * 1.0 * 4 / 6) = 8
    assert window_sizes(np.array([0.0, 0.0, 0.0, 1.0]), 6, 10).tolist() == [2, 2, 2, 8]


def test_curvature_weights_and_run():
    assert leading_run(np.array([3.0, 3.0, 1.0, 3.0])) == 2
    assert leading_run(np.array([1.0, 2.0])) == 1
    z = np.array([0.0, 1.0, 4.0, 9.0, 3.0, -2.0, 0.5])
    g, run = curvature_weights(z)
    raw = np.gradient(np.gradient(z))
    assert run == leading_run(raw)
    assert g.min() >= 0.0 and g.max() <= 1.0 and abs(g.mean() - 0.5) < 1e-9
    # an affine map of the raw curvature (order preserved) that touches one end of [0, 1]
    assert np.array_equal(np.argsort(g, kind="stable"), np.argsort(raw, kind="stable"))
    assert np.isclose(g.min(), 0.0) or np.isclose(g.max(), 1.0)


def test_skip_rule_hand_computed_thresholds():
    c = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    rule = skip_rule(c, 0.5)
    z = (c - c.mean()) / (c.std() + 1e-6)
    assert np.allclose(rule.z, z)
    for k, w in enumerate(rule.windows):
        nb = [j for j in range(max(0, k - w // 2), min(6, k + w // 2 + 1)) if j != k]
        assert np.isclose(rule.thresholds[k], z[nb].mean() - 0.5 * z[nb].std())
    assert rule.layers == frozenset(k + 1 for k in range(6) if z[k] < rule.thresholds[k])


def test_lambda_controller():
    assert update_lambda(0.0, 0.8, 0.4) == pytest.approx(0.05)  # too many skips: raise λ
    assert update_lambda(0.0, 0.2, 0.4) == pytest.approx(-0.05)  # too few: lower λ
    assert update_lambda(0.1, 0.5, 0.4) == 0.1  # inside [ρ, ρ + 0.25]


def _numpy_conf(h: np.ndarray) -> float:
    e = np.exp(h - h.max(-1, keepdims=True))
    p = e / e.sum(-1, keepdims=True)
    entropy = -(p * np.log(p)).sum(-1).mean()
    return 1.0 - entropy / np.log(h.shape[-1])


def test_confidence_from_captured_sublayers_equals_numpy():
    model = tiny_model(layers=6, std=0.5)
    ids = list(range(3, 30))
    W = 10
    c = layer_confidences(model, ids, W)
    with torch.inference_mode(), capture_sublayers(model) as cap:
        model(input_ids=torch.tensor([ids]), use_cache=False)
    expected = [
        _numpy_conf(cap[i]["attn"][0, -W:].numpy()) + _numpy_conf(cap[i]["mlp"][0, -W:].numpy()) for i in range(1, 5)
    ]
    assert c.shape == (4,)
    assert np.allclose(c, expected, atol=1e-9)
    assert all(0.0 <= x <= 2.0 for x in c)
    # a one-hot-like update is fully confident, a constant one not at all
    assert sublayer_confidence(torch.tensor([[0.0] * 7 + [1e4]])) == pytest.approx(1.0)
    assert sublayer_confidence(torch.zeros(3, 8)) == pytest.approx(0.0)
