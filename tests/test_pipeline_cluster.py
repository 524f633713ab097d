"""The README's cluster recipe, run as written, with Ray's token authentication on.

The recipe's lines are read from README.md (the fenced block after ``<!-- cluster-recipe``) and
run in order in one bash shell from the repository root, whose PATH does not hold the project's
virtual environment until the recipe's own ``source .venv/bin/activate``. What differs from a
user's shell, and why:

- HOME is a temporary directory, so ``ray get-auth-token --generate`` writes the token there, not
  to the user's ``~/.ray``;
- ``ray start --head`` gets free ports (GCS, dashboard, dashboard agent, Ray client server: the
  defaults may be taken by other Ray clusters on this machine, and a head whose dashboard agent
  cannot bind answers every submit with "No available agent") and its own ``--temp-dir`` appended,
  and the submit's ``--address`` names that dashboard port;
- the job's ``output.path=...`` becomes a temporary directory, followed by overrides for a tiny
  random model on a 4-row corpus (the bundled model would take minutes on 2 cores).
- ``RAY_USAGE_STATS_ENABLED=0`` in the environment: no usage-stats notice or upload from a test;
- the submit is run again, 5 s apart for up to 4 minutes, only while Ray answers "No available agent
  to submit job, please try again later" (the head's job agent not up yet on a loaded machine; the
  README says to run it again then).

Then a client without the token is refused, and the job's outputs hold every input id once. The
cluster is stopped by killing the shell's process group (the daemons ``ray start`` leaves behind
are in it), never by ``ray stop``, which would stop every Ray cluster of the user on the machine."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.pipeline_helpers import free_port, job_overrides, save_tiny_model, write_corpus

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = REPO / ".venv" / "bin"


def readme_recipe() -> list[str]:
    """The shell lines of the README's cluster recipe, as written."""
    text = (REPO / "README.md").read_text()
    m = re.search(r"<!-- cluster-recipe\b.*?-->\s*```(?:bash|sh)\n(.*?)```", text, re.S)
    assert m, "README.md has no fenced block after <!-- cluster-recipe ... -->"
    return [line for line in m.group(1).splitlines() if line.strip()]


def substitute(lines: list[str], old: str, new: str) -> list[str]:
    """Replace ``old`` by ``new`` in exactly one line (the recipe changed if it is not there once)."""
    hits = [i for i, line in enumerate(lines) if old in line]
    assert len(hits) == 1, f"the README's cluster recipe should hold {old!r} once, found it {len(hits)} times"
    out = list(lines)
    out[hits[0]] = out[hits[0]].replace(old, new, 1)
    return out


# What the README tells a user whose submit comes before the head's job agent is up: run it again. Ray
# answers that case, and only that case, with this message before it creates a job, so a retry is safe.
SUBMIT_WHEN_READY = """submit_when_ready() {
  local until=$((SECONDS + 240))
  while true; do
    if out=$(eval "$1" 2>&1); then printf '%s\\n' "$out"; return 0; fi
    printf '%s\\n' "$out"
    case "$out" in *"No available agent to submit job"*) ;; *) return 1 ;; esac
    [ "$SECONDS" -lt "$until" ] || return 1
    sleep 5
  done
}
"""


def stop_process_group(pgid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        for _ in range(40):  # up to 20 s for the group to empty
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            subprocess.run(["sleep", "0.5"])


def test_readme_cluster_recipe(tmp_path):
    if not (VENV_BIN / "activate").is_file():
        pytest.skip("the recipe activates the project's .venv (make setup), which this checkout lacks")
    model = save_tiny_model(tmp_path / "model")
    ids = write_corpus(tmp_path / "c.jsonl", n=4)
    out = tmp_path / "out"
    port, dash, agent, client = free_port(), free_port(), free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars

    lines = readme_recipe()
    lines = substitute(lines, "ray start --head",
                       f"ray start --head --port={port} --dashboard-port={dash} --dashboard-agent-listen-port={agent} "
                       f"--ray-client-server-port={client} --temp-dir={temp_dir}")
    lines = substitute(lines, "--address http://127.0.0.1:8265", f"--address http://127.0.0.1:{dash}")
    overrides = job_overrides(model, str(tmp_path / "c.jsonl"), str(out))
    lines = substitute(lines, "output.path=$PWD/outputs/cluster", " ".join(shlex.quote(o) for o in overrides))
    submit = [i for i, line in enumerate(lines) if line.startswith("ray job submit ")]
    assert len(submit) == 1, "the README's cluster recipe should end in one `ray job submit` line"
    lines[submit[0]] = f"submit_when_ready {shlex.quote(lines[submit[0]])}"
    script = "set -e\n" + SUBMIT_WHEN_READY + "\n".join(lines) + "\n"

    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_") and k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    # a user's shell before activation: the project's environment is not on PATH
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "/usr/bin:/bin").split(os.pathsep)
                                  if p and Path(p).resolve() != VENV_BIN.resolve())
    env["HOME"] = str(tmp_path / "home")
    env["RAY_USAGE_STATS_ENABLED"] = "0"  # no usage-stats notice or upload from a test
    (tmp_path / "home").mkdir()

    shell = subprocess.Popen(["bash", "-c", script], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        try:
            log, _ = shell.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            stop_process_group(shell.pid)
            log, _ = shell.communicate()
            pytest.fail("the README's cluster recipe did not finish in 600 s:\n" + log[-4000:])
        assert shell.returncode == 0, f"the README's cluster recipe failed (exit {shell.returncode}):\n{log[-6000:]}"
        assert "succeeded" in log.lower(), log[-4000:]
        token = tmp_path / "home" / ".ray" / "auth_token"
        assert token.is_file() and token.read_text().strip(), "ray get-auth-token --generate wrote no token"

        # a client without the token (another HOME, no RAY_AUTH_MODE) is refused
        (tmp_path / "stranger").mkdir()
        stranger = {**env, "HOME": str(tmp_path / "stranger"), "PATH": f"{VENV_BIN}{os.pathsep}{env['PATH']}"}
        anonymous = subprocess.run([str(VENV_BIN / "ray"), "job", "list", "--address", f"http://127.0.0.1:{dash}"],
                                   env=stranger, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert anonymous.returncode != 0, anonymous.stdout[-2000:]
        assert "authentication" in (anonymous.stdout + anonymous.stderr).lower(), anonymous.stderr[-2000:]

        files = sorted((out / "generations").glob("*.parquet"))
        got = [i for f in files for i in pq.read_table(f).column("id").to_pylist()]
        assert sorted(got) == sorted(ids)
        metrics = pq.read_table(out / "metrics.parquet").to_pylist()
        assert metrics[-1]["dataset"] == "__all__" and metrics[-1]["rows_ok"] == 4
    finally:  # the cluster's processes are exactly the shell's process group
        stop_process_group(shell.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)
