"""Skip-set policies per dataset: the one place where the searcher (``conflayers.search``) plugs in.

``make_policy`` builds a dataset's policy with ``conflayers.search.policy.make_policy`` (``conflayers`` |
``static`` | ``swift`` | ``none`` | ``cached``). When the coordinator already holds a settled best
set for the dataset (another actor searched it), a searching policy is replaced by that set, so a
late actor starts warm instead of searching from scratch.
"""

from __future__ import annotations

from conflayers.layers import num_layers, validate_skip_set
from conflayers.search.policy import make_policy as search_policy
from conflayers.search.static import StaticSkip

SEARCHING = ("conflayers", "swift")


def make_policy(name: str, model, skip_layers=None, knobs: dict | None = None, warm: list[int] | None = None,
                dataset: str | None = None, registry: str | None = None):
    """A policy (``skip_set()`` / ``observe()``) for one dataset."""
    knobs = dict(knobs or {})
    if name in SEARCHING and warm is not None:
        return StaticSkip(validate_skip_set(warm, num_layers(model)))
    if name == "static":
        knobs.setdefault("layers", list(skip_layers) if skip_layers else None)
    if name == "cached":
        knobs.setdefault("registry", registry)
        knobs.setdefault("dataset", dataset)
        if not knobs["registry"]:
            raise ValueError("search.registry: the cached searcher needs a registry path")
    return search_policy(name, model, **knobs)


def policy_state(policy) -> dict:
    return policy.state() if hasattr(policy, "state") else {}


def search_iterations(policy) -> int:
    return int(policy_state(policy).get("iterations") or getattr(policy, "iterations", 0) or 0)


def is_settled(policy) -> bool:
    """Whether the policy's current set is its answer (not a candidate under evaluation)."""
    return policy_state(policy).get("phase") != "search"


def current_set(policy) -> list[int]:
    """The set the policy stands by now: its best when searching/settled, else its current one."""
    st = policy_state(policy)
    s = (st.get("best") if st.get("phase") == "installed" else None) or st.get("skip_set")
    if s is None and hasattr(policy, "layers"):
        s = policy.layers
    return sorted(s or [])
