"""Every Ray API below the public one that the node-loss tests use, in one place.

``ray.cluster_utils.Cluster`` (Ray's own multi-node-on-one-machine test utility: ``add_node`` /
``remove_node``), the GCS health-check settings that make a lost node noticed in ~3 s instead of
~30 s (``_system_config``), ``ray.util.state.list_actors`` (the state API, alpha) to find the
node an actor runs on, ``ray drain-node`` (a hidden developer command) and the process title Ray
gives a Serve replica's worker. If a Ray upgrade moves one of them, only this file changes."""

from __future__ import annotations

import time

# a node is declared dead after 3 missed 1 s health checks (Ray's own fault-tolerance tests do the same)
FAST_NODE_DEATH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                   "health_check_failure_threshold": 3}


def start_cluster(workers: int, cpus_per_worker: int):
    """A head that runs no generation (0 CPUs: the driver and the coordinator live there) and
    ``workers`` worker nodes; the calling process is connected as the driver."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": FAST_NODE_DEATH})
    for _ in range(workers):
        cluster.add_node(num_cpus=cpus_per_worker)
    ray.init(address=cluster.address, include_dashboard=False, configure_logging=False)
    cluster.wait_for_nodes()
    return cluster


def stop_cluster(cluster) -> None:
    import ray

    ray.shutdown()
    cluster.shutdown()


def add_node(cluster, cpus: int):
    node = cluster.add_node(num_cpus=cpus)
    cluster.wait_for_nodes()
    return node


def remove_node(cluster, node) -> None:
    """The node's raylet and every process on it killed at once (a failed host, a spot instance gone)."""
    cluster.remove_node(node, allow_graceful=False)


def actor_nodes(class_part: str) -> dict[str, str]:
    """{actor id: node id} of the live actors whose class name contains ``class_part``."""
    from ray.util.state import list_actors

    return {a.actor_id: a.node_id for a in list_actors(filters=[("state", "=", "ALIVE")])
            if class_part in a.class_name}


def node_of_a_generation_actor(cluster, timeout: float = 120.0):
    """A worker node that holds a generation actor right now."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        held = set(actor_nodes("GenerationActor").values())
        for node in cluster.worker_nodes:
            if node.node_id in held:
                return node
        time.sleep(0.2)
    raise TimeoutError("no generation actor came up on a worker node")


def preempt_node(cluster, node, grace_s: int) -> None:
    """A spot preemption: GCS is told the node goes in ``grace_s`` seconds (``ray drain-node``, the API
    autoscaler v2 uses for preemption: no new work is placed there, running work may finish), then
    after the grace period the node is killed as a cloud would."""
    import subprocess
    import sys
    from pathlib import Path

    ray_cli = str(Path(sys.executable).with_name("ray"))
    done = subprocess.run([ray_cli, "drain-node", "--address", cluster.address, "--node-id", node.node_id,
                           "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot instance reclaimed",
                           "--deadline-remaining-seconds", str(grace_s)], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"ray drain-node failed: {done.stderr[-2000:]}")
    time.sleep(grace_s)
    remove_node(cluster, node)


def replica_pids_by_process_title(app: str, deployment: str) -> list[int]:
    """A Serve deployment's replica processes, found by the title Ray gives an actor's worker process
    (``ray::ServeReplica:<app>:<deployment>``): Ray's naming, not a public API."""
    import psutil

    return [p.pid for p in psutil.process_iter(["cmdline"])
            if f"ServeReplica:{app}:{deployment}" in " ".join(p.info["cmdline"] or [])]



def actor_pids(class_name: str) -> dict[str, int]:
    """{actor id: worker process id} of the live actors of class ``class_name``, from the
    GCS actor table (``ray._private.state.actors``: works without the dashboard the state API needs): the
    process to SIGKILL to kill an actor as the OOM killer would."""
    from ray._private import state

    return {aid: a["Pid"] for aid, a in state.actors().items()
            if a["State"] == "ALIVE" and a["ActorClassName"] == class_name and a["Pid"]}


def memory_in_use() -> float:
    """Bytes of the cluster's ``memory`` resource that live tasks and actors have declared (total - available)."""
    import ray

    return ray.cluster_resources().get("memory", 0.0) - ray.available_resources().get("memory", 0.0)
