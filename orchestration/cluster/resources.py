"""The Ray resources of a stage's workers, from [stage.resources] and what the backend declares
(orchestration/core/backends.Capabilities), and the Ray options that ask for them.

    need = worker_resources("torch", {"cpus": 4}, ray.cluster_resources(), node_cpus=16)
    task.options(**ray_options(need))          # {"num_cpus": 4, "num_gpus": 1} on a GPU cluster

One worker's resources are always in Ray's shape ({"CPU": 4, "GPU": 1}, {"CPU": 1,
"apple_silicon": 1}): the runner resolves them once, and the launchers (train_group.py,
ring_group.py) take them as they are.
"""

from __future__ import annotations

from hanyeong.errors import ConfigError
from orchestration.core.backends import capabilities


def worker_resources(backend: str, resources: dict, cluster: dict, node_cpus: int, workers: int = 1,
                     where: str = "stage") -> dict:  # fmt: skip
    """Ray resources of one worker of a stage of `backend`, from [stage.resources] ({"cpus",
    "gpus"}) and the backend's capabilities: its device (device_resource) where it requires one, or
    where it takes GPUs and they are asked (`gpus`) or, when not said, the cluster has some
    (`gpus = 0` keeps a stage on CPUs); else CPUs: a node's worth, shared out when several workers
    split the cluster (Ray sets OMP_NUM_THREADS to a task's CPUs)."""
    caps = capabilities(backend)
    gpus, device = resources.get("gpus"), caps.device_resource
    if gpus and not caps.takes_gpus:
        raise ConfigError(f"{where}: resources.gpus is not for backend {backend} (its workers ask "
                          f"for {device or 'CPUs'}, not GPUs)")  # fmt: skip
    if caps.device_required:
        need = {"CPU": 1, device: 1}
    elif caps.takes_gpus and (gpus or (gpus is None and cluster.get(device, 0) > 0)):
        need = {"CPU": 1, device: gpus or 1}
    else:
        need = {"CPU": max(1, min(node_cpus, int(cluster.get("CPU", 1)) // workers))}
    if "cpus" in resources:
        cpus = resources["cpus"]
        if not (isinstance(cpus, int | float) and cpus > 0):
            raise ConfigError(f"{where}: resources.cpus must be a positive number, got {cpus!r}")
        need["CPU"] = cpus
    return need


def ray_options(need: dict) -> dict:
    """Ray's task/actor options asking for one worker's resources: num_cpus, num_gpus, resources."""
    need = dict(need)
    options = {"num_cpus": need.pop("CPU", 1)}
    if "GPU" in need:
        options["num_gpus"] = need.pop("GPU")
    if need:
        options["resources"] = need
    return options
