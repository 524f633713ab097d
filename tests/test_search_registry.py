"""The skip-set registry: round trip, atomic writes, and rejection of bad entries."""

import json

import pytest

from conflayers.search.policy import make_policy
from conflayers.search.registry import RegistryError, SkipSetEntry, entry_key, load_entry, model_identity, save_entry

from .conftest import tiny_model


def entry(**kw):
    base = dict(model="m|llama|L8|H64", dataset="gsm8k", layers=[2, 5], n_layers=8, lam=0.15, objective="throughput",
                score=42.0, acceptance=0.8, tau=2.5, speedup=1.2, iterations=7)
    return SkipSetEntry(**{**base, **kw})


def test_round_trip_and_several_entries(tmp_path):
    path = tmp_path / "sub" / "skipsets.json"
    a, b = entry(), entry(dataset="cnndm", layers=[3], objective="acceptance", speedup=None)
    save_entry(path, a)
    save_entry(path, b)
    assert load_entry(path, a.model, "gsm8k", 8) == a
    assert load_entry(path, a.model, "cnndm", 8) == b
    assert [p.name for p in path.parent.iterdir()] == ["skipsets.json"]  # no temporary files left
    save_entry(path, entry(layers=[4]))  # replacing an entry
    assert load_entry(path, a.model, "gsm8k").layers == [4]


def _write_raw(path, **changes):
    raw = {**entry().__dict__, **changes}
    path.write_text(json.dumps({"version": 1, "entries": {entry_key(raw["model"], raw["dataset"]): raw}}))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"layers": [0, 3]}, "layer 0 is out of range"),
        ({"layers": [7]}, "layer 7 is out of range"),
        ({"layers": [2, 2]}, "layers repeat"),
        ({"layers": ["3"]}, "is not an integer"),
        ({"layers": [True]}, "is not an integer"),
        ({"layers": "2,5"}, "must be a list"),
        ({"lam": "0.1"}, "'lam' must be a finite number"),
        ({"score": float("nan")}, "'score' must be a finite number"),
        ({"iterations": -1}, "non-negative integer"),
        ({"objective": "speed"}, "objective must be"),
        ({"extra": 1}, "unknown field"),
        ({"n_layers": 30}, "30-layer model; this model has 8"),
    ],
)
def test_bad_entries_are_rejected(tmp_path, changes, message):
    path = tmp_path / "r.json"
    _write_raw(path, **changes)
    with pytest.raises(RegistryError, match=message):
        load_entry(path, "m|llama|L8|H64", "gsm8k", 8)


@pytest.mark.parametrize(
    "text, message",
    [("{not json", "not valid JSON"), ("[]", "must be an object"), ('{"version": 9, "entries": {}}', "version 9")],
)
def test_corrupt_files_are_rejected(tmp_path, text, message):
    path = tmp_path / "r.json"
    path.write_text(text)
    with pytest.raises(RegistryError, match=message):
        load_entry(path, "m", "d")


def test_missing_entry_and_cached_policy(tmp_path):
    model = tiny_model(layers=8)
    path = tmp_path / "r.json"
    with pytest.raises(RegistryError, match="no entry for model"):
        make_policy("cached", model, registry=str(path), dataset="gsm8k")
    save_entry(path, entry(model=model_identity(model)))
    policy = make_policy("cached", model, registry=str(path), dataset="gsm8k")
    assert policy.skip_set() == frozenset({2, 5})
    assert policy.state()["cache"]["lam"] == 0.15
    save_entry(path, entry(model=model_identity(model), dataset="empty", layers=[]))
    assert make_policy("cached", model, registry=str(path), dataset="empty").skip_set() is None  # cached "plain"
