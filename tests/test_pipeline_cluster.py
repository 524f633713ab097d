"""The README's cluster recipe, step by step, with Ray's token authentication on:
`ray get-auth-token --generate` (writes ~/.ray/auth_token; HOME is a temporary directory here),
`ray start --head` (token authentication on, since a token exists), then
`RAY_AUTH_MODE=token ray job submit --working-dir . -- python -m jobs.generate ...`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.pipeline_helpers import env_with_venv, free_port, job_overrides, save_tiny_model, write_corpus

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _ray(*args, env, **kw):
    return subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), *args], env=env, cwd=REPO,
                          capture_output=True, text=True, **kw)


def test_ray_job_submit(tmp_path):
    model = save_tiny_model(tmp_path / "model")
    ids = write_corpus(tmp_path / "c.jsonl", n=4)
    out = tmp_path / "out"
    port, dash = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    env = env_with_venv()  # so the job's `python` is this environment's
    for k in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(k, None)
    env["HOME"] = str(tmp_path / "home")  # where `ray start --head` puts the token: not the user's ~/.ray
    client = {**env, "RAY_AUTH_MODE": "token"}  # the README's submitting shell
    gen = _ray("get-auth-token", "--generate", env=env, timeout=60)
    assert gen.returncode == 0, gen.stderr[-2000:]
    token = Path(env["HOME"]) / ".ray" / "auth_token"
    assert token.is_file() and token.read_text().strip(), "ray get-auth-token --generate wrote no token"
    # `ray start --block` in its own process group: stopping it stops exactly this cluster (never `ray stop`,
    # which would also stop other Ray clusters on the machine)
    head = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--block", f"--port={port}",
         "--num-cpus=3", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 90
        while True:  # wait for the job server
            if _ray("job", "list", "--address", address, env=client, timeout=60).returncode == 0:
                break
            assert head.poll() is None, "ray start --head exited"
            assert time.time() < deadline, "the Ray job server did not come up"
            time.sleep(2)
        (tmp_path / "stranger").mkdir()  # a client without the token is refused
        anonymous = _ray("job", "list", "--address", address, env={**env, "HOME": str(tmp_path / "stranger")},
                         timeout=60)
        assert anonymous.returncode != 0 and "authentication" in (anonymous.stdout + anonymous.stderr).lower()
        sub = _ray("job", "submit", "--address", address, "--working-dir", ".", "--",
                   "python", "-m", "jobs.generate", *job_overrides(model, str(tmp_path / "c.jsonl"), str(out)),
                   env=client, timeout=400)
        assert sub.returncode == 0, sub.stdout[-3000:] + sub.stderr[-3000:]
        assert "succeeded" in (sub.stdout + sub.stderr).lower()
        files = sorted((out / "generations").glob("*.parquet"))
        got = [i for f in files for i in pq.read_table(f).column("id").to_pylist()]
        assert sorted(got) == sorted(ids)
        metrics = pq.read_table(out / "metrics.parquet").to_pylist()
        assert metrics[-1]["dataset"] == "__all__" and metrics[-1]["rows_ok"] == 4
    finally:  # the cluster's processes are exactly this process group
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                break
            try:
                head.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                pass
        try:  # survivors of a graceful stop (the head exits first)
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
