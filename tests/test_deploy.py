"""deploy/rayjob.yaml: a valid KubeRay RayJob whose entrypoint is a valid invocation of the job."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from jobs.generate import load_config

REPO = Path(__file__).resolve().parents[1]


def test_the_rayjob_manifest_is_a_rayjob_that_runs_the_generation_job():
    doc = yaml.safe_load((REPO / "deploy" / "rayjob.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob" and doc["metadata"]["name"]
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        (c,) = pod["spec"]["containers"]
        assert c["image"] and c["resources"]["limits"]["cpu"]
        assert c["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]  # credentials only from a Secret
        assert not any(k in str(c).lower() for k in ("aws_secret_access_key:", "password"))
    assert all(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
               for g in cluster["workerGroupSpecs"])
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.generate"]
    assert argv[3] == "--config" and (REPO / argv[4]).is_file()
    cfg = load_config(str(REPO / argv[4]), argv[5:])  # the job's own parser accepts every override
    assert cfg.input.path.startswith("s3://") and cfg.output.path.startswith("s3://")
    assert cfg.storage.key is None and cfg.storage.secret is None  # s3fs reads AWS_* from the Secret's env
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"]
