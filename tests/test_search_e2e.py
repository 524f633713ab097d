"""Every searcher end to end on the bundled SmolLM2: a stream of chat prompts in batches through
one policy object, greedy output identical to plain decoding; the CLI and the plot CLI."""

import json
import os
import subprocess
import sys

import pytest

from conflayers import Engine, GenerationConfig, LayerSkipDrafter
from conflayers.models import encode_prompts
from conflayers.search.policy import make_policy
from conflayers.search.registry import SkipSetEntry, load_entry, model_identity, save_entry

pytestmark = pytest.mark.slow

PROMPTS = ["Name two colours.", "What is 2+2?", "Write one sentence about the sea."]


pytestmark = pytest.mark.usefixtures("one_thread")


def run_stream(engine, ids, config, drafter=None, batch=2):
    out = []
    for start in range(0, len(ids), batch):
        out += [r.token_ids for r in engine.generate(ids[start : start + batch], config, drafter)]
    return out


def test_every_searcher_keeps_greedy_output(smollm2, tmp_path):
    model, tok = smollm2
    engine = Engine(model)
    ids = encode_prompts(tok, PROMPTS)
    config = GenerationConfig(max_new_tokens=24)
    plain = run_stream(engine, ids, config)
    registry = tmp_path / "skipsets.json"
    save_entry(registry, SkipSetEntry(model=model_identity(model), dataset="demo", layers=[14], n_layers=30))
    knobs = {
        # explore_budget=1.0: the bound pauses a losing search by wall time, which on a loaded
        # machine can pause it before its first iteration; this test is about the search running
        "conflayers": dict(interval=6, max_iter=3, plain_every=3, explore_budget=1.0),
        "swift": dict(max_iter=3, context=16),
        "static": dict(layers=[14]),
        "none": {},
        "cached": dict(registry=str(registry), dataset="demo"),
    }
    for name, kw in knobs.items():
        policy = make_policy(name, model, **kw)
        drafter = LayerSkipDrafter(model, policy, stop_threshold=0.8, max_draft_len=4)
        assert run_stream(engine, ids, config, drafter) == plain, name
        state = policy.state()
        assert state["searcher"] == name
        if name == "conflayers":
            assert policy.iterations >= 1 and state["plain_tokens_per_s"] > 0
        if name == "swift":
            assert policy.iterations == 3 and 0.0 <= state["score"] <= 1.0


def run_cli(*args, module="conflayers"):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=600, env=env)


def test_cli_searcher_stream_json_and_registry(tmp_path):
    f = tmp_path / "qa.jsonl"
    f.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    registry = tmp_path / "r.json"
    r = run_cli("--prompts-file", str(f), "--max-new-tokens", "16", "--batch-size", "2", "--json",
                "--drafter", "layerskip", "--searcher", "conflayers", "--objective", "acceptance", "--interval", "4", "--max-iter", "2", "--window", "4",
                "--registry", str(registry))
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["index"] for row in lines[:-2]] == [0, 1, 2]
    state = lines[-2]["searcher_state"]  # then the run's summary, the last line
    shares = lines[-1]["summary"]["step_shares"]
    assert abs(shares["layerskip"] + shares["plain"] - 1) < 1e-3 and shares["ngram"] == shares["corpus"] == 0
    assert state["searcher"] == "conflayers" and state["objective"] == "acceptance"
    assert {"skip_set", "lambda", "iterations", "score", "plain_tokens_per_s"} <= set(state)
    if state["phase"] != "search":
        entry = load_entry(registry, "smollm2-135m-instruct|llama|L30|H576", "qa", 30)
        assert entry.objective == "acceptance" and entry.iterations == state["iterations"]
    bad = run_cli("hi", "--searcher", "cached", "--registry", str(tmp_path / "none.json"))
    assert bad.returncode == 2 and "no entry for model" in bad.stderr
    bad = run_cli("hi", "--searcher", "conflayers", "--explore-budget", "0")
    assert bad.returncode == 2 and "explore_budget must be in (0, 1]" in bad.stderr


def test_plot_cli_writes_a_png(tmp_path):
    from conflayers.search import plot

    out = tmp_path / "conf.png"
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "Why is the sky blue?"}) + "\n")
    assert plot.main(["--prompts-file", str(f), "--max-new-tokens", "8", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
