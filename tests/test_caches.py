"""A test run leaves the user's caches alone (``tests/conftest.py: private_caches``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]


def test_calibrating_with_the_default_cache_writes_the_private_one(private_caches):
    from conflayers.costs.calibrate import load_or_calibrate
    from conflayers.costs.width import default_cache_file
    from conflayers.engine import Engine

    assert default_cache_file().parent == private_caches
    load_or_calibrate(Engine(tiny_model(layers=2)), [1], [1, 2])  # no cache file named: the default one
    assert (private_caches / "costs.json").is_file()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"].startswith(str(private_caches))


def snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
            for p in sorted(directory.rglob("*"))}


def test_a_test_run_leaves_the_users_cache_alone(tmp_path):
    """The test above, run as a user runs the tests (their environment, a home with a cache in it)."""
    home = tmp_path / "home"
    cache = home / ".cache" / "conflayers"
    (cache / "models").mkdir(parents=True)
    (cache / "widths.json").write_text("{}")
    (cache / "costs.json").write_text("{}")
    before = snapshot(cache)
    env = {k: v for k, v in os.environ.items()
           if k not in ("CONFLAYERS_CACHE", "CONFLAYERS_MODELS", "TORCHINDUCTOR_CACHE_DIR", "XDG_CACHE_HOME")}
    env["HOME"] = str(home)
    test = f"{Path(__file__).relative_to(ROOT)}::test_calibrating_with_the_default_cache_writes_the_private_one"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 passed" in r.stdout
    assert snapshot(cache) == before
