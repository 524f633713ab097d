"""``python -m conflayers`` end to end on the bundled model."""

import json
import os
import subprocess
import sys

import pytest


def run_cli(*args, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "conflayers", *args], capture_output=True, text=True, timeout=timeout, env=env)


def rows_of(stdout: str) -> list[dict]:
    """The per-prompt lines of a ``--json`` run, by index (the state and summary lines left out)."""
    return sorted((r for r in map(json.loads, stdout.splitlines()) if "index" in r), key=lambda r: r["index"])


def test_json_output_speculative_equals_plain(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "Name two colours."}) + "\n\n" + json.dumps({"prompt": "Repeat: red, green, red, green."}) + "\n")
    common = ("--prompts-file", str(f), "--max-new-tokens", "12", "--json")
    plain = run_cli(*common, "--drafter", "none")
    spec = run_cli(*common, "--drafter", "layerskip", "--skip-layers", "14", "--batch-size", "2")
    auto = run_cli(*common, "--costs", str(tmp_path / "costs.json"))  # drafter auto is the default
    ngram = run_cli(*common, "--drafter", "ngram", "--batch-size", "1")
    for r in (auto, ngram):
        assert r.returncode == 0, r.stderr
        rows = rows_of(r.stdout)
        assert [r["output"] for r in rows] == [r["output"] for r in rows_of(plain.stdout)]
        assert all(sum(r["drafter_steps"].values()) == r["steps"] for r in rows)
        summary = json.loads(r.stdout.splitlines()[-1])["summary"]  # the last line: the run's step shares
        steps = sum(r["steps"] for r in rows)
        assert summary["step_shares"]["ngram"] == round(sum(r["drafter_steps"].get("ngram", 0) for r in rows) / steps, 4)
    assert (tmp_path / "costs.json").exists()  # auto measured the cost surface and cached it
    state = [json.loads(line)["drafter_state"] for line in auto.stdout.splitlines() if "drafter_state" in line]
    assert state and sum(state[0]["decisions"].values()) > 0
    assert "p" in json.loads(auto.stdout.splitlines()[-1])["summary"]["corpus_index"]  # auto drafts from the corpus too
    assert plain.returncode == 0, plain.stderr
    assert spec.returncode == 0, spec.stderr
    p_rows, s_rows = rows_of(plain.stdout), rows_of(spec.stdout)
    assert [r["index"] for r in s_rows] == [0, 1]
    assert all(r["width"] == 2 for r in s_rows)
    assert [r["output"] for r in s_rows] == [r["output"] for r in p_rows]
    for r in s_rows:
        assert 1 <= r["new_tokens"] <= 12 and r["finish_reason"] in ("stop", "length")
        assert r["skip_set"] in ([14], [])  # [] when no step drafted anything
        assert {"steps", "drafted", "accepted", "acceptance_rate", "tau", "accept_hist", "prefill_seconds", "decode_seconds"} <= set(r)
    assert all(r["drafted"] == 0 and r["tau"] == 1.0 for r in p_rows)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--skip-layers", "0,3"], "skip-set layer 0 is out of range"),
        (["--skip-layers", "29"], "skip-set layer 29 is out of range"),
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--top-p", "0"], "top_p must be in (0, 1]"),
        (["--model", "/nonexistent/model"], "model path not found: /nonexistent/model"),
        (["--batch-size", "0"], "--batch-size takes auto or an integer >= 1, got '0'"),
        (["--kernels", "fast"], "invalid choice: 'fast'"),
        (["--kv-cache-gb", "-1"], "--kv-cache-gb must be > 0"),
        (["--drafter", "ngram", "--skip-layers", "3"], "--drafter ngram makes none"),
        (["--drafter", "fast"], "invalid choice: 'fast'"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(args, message):
    r = run_cli("hello", *args)
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_calibrate_prints_the_surface_draws_it_and_caches_it(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "-m", "conflayers.costs.calibrate", "--widths", "1,2", "--qs", "1,2",
            "--cache", str(tmp_path / "costs.json"), "--out", str(tmp_path / "costs.png")]
    first = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert first.returncode == 0, first.stderr
    assert "measured now" in first.stdout and "| width | q=1 ms | q=2 ms |" in first.stdout
    assert (tmp_path / "costs.png").stat().st_size > 1000
    again = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0 and "from the cache" in again.stdout
    bad = subprocess.run(args[:3] + ["--widths", "0"], capture_output=True, text=True, timeout=600, env=env)
    assert bad.returncode == 2 and "integers >= 1" in bad.stderr
