"""A stage's worker group as a ring, for a backend whose capabilities say launcher = 'ring' (MLX):
one rank per device (a Mac), placed by a Ray placement group, joined by the backend (MLX: the ring
backend of `mx.distributed`, over TCP; Thunderbolt or Ethernet), data-parallel.

    run_ring_group(config, workers, parallel, need, retries)   inside the stage's Ray task
                                                                (num_cpus=0: it coordinates)

1. A placement group of `workers` bundles, each `need` (the runner's
   orchestration/cluster/resources.worker_resources: {"CPU": c, "apple_silicon": 1}), strategy
   SPREAD. A Mac declares one `apple_silicon` (`ray start --resources='{"apple_silicon": 1}'`), so
   that resource alone already puts one rank per Mac; SPREAD (not STRICT_SPREAD) still lets a node
   that declares several (a test machine, a Mac Studio asked to run 2 ranks) hold several ranks,
   where STRICT_SPREAD would never be placed.
2. One `_Rank` actor per bundle opens its endpoint of the ring on its node's address
   (`open_rendezvous`; MLX: a free TCP port, on HANYEONG_MLX_RING_IP where the node sets it).
3. Every actor joins the ring of all the endpoints in bundle order (rank r = bundle r) through
   `join_group`, within JOIN_TIMEOUT_S (MLX waits forever for a rank it cannot reach); then each
   notes its attempt in STAGE_DIR/attempts.jsonl and runs
   `run_stage({**config, "workers": workers, "parallel": parallel, "device": device})`.
4. Rank 0's result is the stage's. An actor that dies (ActorDiedError: its process or its Mac is
   gone; or a rank whose ring lost its peer) tears the whole group down and starts it again, up to
   `retries` times; run_stage resumes from the last checkpoint. A Python exception of a rank
   (HanyeongError, or any other) is raised as it is, not retried.

Every node must see the run directory, the datasets and the tokenizer at the same paths (shared
storage): all ranks read the same checkpoint and rank 0 alone writes it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from hanyeong.errors import ConfigError, HanyeongError
from orchestration.cluster.resources import ray_options
from orchestration.core.backends import capabilities, get_backend

PLACEMENT_TIMEOUT_S = 600.0  # how long the ranks may wait for enough free devices
JOIN_TIMEOUT_S = 120.0  # how long the ranks may take to connect their ring (MLX itself waits forever)
FAILURE_GRACE_S = 10.0  # after a rank fails, how long to wait for the others' own outcome


# ---- pure: the layout -----------------------------------------------------------------------------


def bundle_layout(workers: int, need: dict) -> tuple[list[dict], str]:
    """The placement group: one bundle per rank, each `need` (Ray's resources of one worker), and
    its strategy."""
    if workers < 2:
        raise ConfigError(f"a ring group needs workers >= 2, got {workers}; one worker is a plain "
                          "stage task")  # fmt: skip
    return [dict(need) for _ in range(workers)], "SPREAD"


# ---- one rank -----------------------------------------------------------------------------------


class _Rank:
    """A Ray actor (one per bundle): a process that joins the ring once and runs its rank of the
    stage, on backend `name`."""

    def __init__(self, name: str, accelerator: bool, cpus: float):
        self.name, self.accelerator, self.cpus = name, accelerator, cpus
        self.device, self.endpoint = None, None

    def open(self) -> dict:
        """This rank's part of the ring's rendezvous, opened on its node's address."""
        import ray

        backend = get_backend(self.name)
        self.device = backend.bind_device(self.accelerator, self.cpus)
        host = ray.util.get_node_ip_address()
        self.endpoint = get_backend(self.name, self.device).open_rendezvous(host)
        return self.endpoint

    def join(self, rendezvous: dict, rank: int, size: int) -> tuple[int, int]:
        """Join the ring as `rank`; returns (rank, size) once every rank is connected."""
        backend = get_backend(self.name, self.device)
        backend.join_group(rank, size, rendezvous)
        return backend.world()

    def run(self, config: dict, workers: int, parallel: str, rank: int) -> dict:
        import ray

        from orchestration.pipeline.stage import run_stage

        note = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "rank": rank,
                "node": ray.get_runtime_context().get_node_id(), "endpoint": self.endpoint}  # fmt: skip
        stage_dir = Path(config["stage_dir"])
        stage_dir.mkdir(parents=True, exist_ok=True)
        with open(stage_dir / "attempts.jsonl", "a", encoding="utf-8") as out:
            out.write(json.dumps(note) + "\n")
        return run_stage({**config, "workers": workers, "parallel": parallel, "device": self.device})


class _GroupLost(Exception):
    """A rank's process or node is gone (Ray's ActorDiedError, or a rank that lost its ring peer)."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


# ---- the launcher -------------------------------------------------------------------------------


def run_ring_group(config: dict, workers: int, parallel: str, need: dict, retries: int) -> dict:
    """Run stage `config` on `workers` ranks of a ring, each holding `need` (see the module doc);
    rank 0's run_stage result."""
    import ray

    caps = capabilities(config["backend"])
    if parallel not in caps.parallelisms:
        raise ConfigError(f"parallel must be one of {', '.join(caps.parallelisms)} on backend "
                          f"{config['backend']}, got {parallel!r}")  # fmt: skip
    bundles, strategy = bundle_layout(workers, need)
    rank_args = (config["backend"], caps.device_resource in need, need.get("CPU", 1))  # _Rank's
    for attempt in range(retries + 1):
        try:
            return _attempt(ray, config, workers, parallel, rank_args, bundles, strategy)
        except _GroupLost as lost:
            if attempt == retries:
                raise lost.error from None
    raise AssertionError("unreachable")


def _attempt(ray, config: dict, workers: int, parallel: str, rank_args: tuple, bundles: list[dict],
             strategy: str) -> dict:  # fmt: skip
    """One start of the group: place, join, run; everything it started is gone when it returns."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg = placement_group(bundles, strategy=strategy)
    actors = []
    try:
        ready, _ = ray.wait([pg.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            device = capabilities(config["backend"]).device_resource
            raise ConfigError(f"could not place {len(bundles)} ranks ({bundles[0]} each) within "
                              f"{PLACEMENT_TIMEOUT_S:.0f} s: the cluster has {ray.cluster_resources()}; "
                              f"each node joins with `ray start --address ... --resources='{{\"{device}\": 1}}'`")  # fmt: skip
        rank_actor = ray.remote(max_restarts=0)(_Rank)  # a dead rank is restarted with its whole group
        for i, bundle in enumerate(bundles):
            strategy_i = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)
            actors.append(rank_actor.options(**ray_options(bundle), scheduling_strategy=strategy_i)
                          .remote(*rank_args))  # fmt: skip
        rendezvous = {"ranks": ray.get([a.open.remote() for a in actors])}
        joined = [a.join.remote(rendezvous, rank, workers) for rank, a in enumerate(actors)]
        ready, _ = ray.wait(joined, num_returns=len(joined), timeout=JOIN_TIMEOUT_S)
        if len(ready) < len(joined):
            _outcome(ray, ready)  # a rank that failed to join says why
            raise ConfigError(f"the {workers} ranks did not connect their ring within "
                              f"{JOIN_TIMEOUT_S:.0f} s ({rendezvous['ranks']}): each node must accept "
                              "TCP on its rank's port from the previous rank's node (firewall); on MLX, "
                              "HANYEONG_MLX_RING_IP sets a node's address where Ray's node IP is not the "
                              "one to use")  # fmt: skip
        groups = _outcome(ray, joined)
        if groups != [(rank, workers) for rank in range(workers)]:
            raise ConfigError(f"the ring made ranks {groups}, expected {workers} ranks in bundle "
                              "order")  # fmt: skip
        runs = [a.run.remote(config, workers, parallel, rank) for rank, a in enumerate(actors)]
        return _outcome(ray, runs)[0]
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        remove_placement_group(pg)


def _outcome(ray, refs: list) -> list:
    """Every rank's result; on the first failure the others get FAILURE_GRACE_S to show their own
    (a rank whose ring peer died fails or hangs), then this raises: a stage's own exception
    (HanyeongError) first, then a dead actor (retried by the caller), then whatever else failed."""
    results, errors, pending, deadline = {}, [], list(refs), None
    while pending:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        done, pending = ray.wait(pending, num_returns=1, timeout=timeout)
        if not done:
            break  # the grace is over: the rest are stuck in a collective with a failed rank
        try:
            results[done[0]] = ray.get(done[0])
        except ray.exceptions.RayError as err:
            errors.append(err)
            deadline = deadline or time.monotonic() + FAILURE_GRACE_S
    if not errors:
        return [results[ref] for ref in refs]
    causes = [getattr(e, "cause", None) for e in errors]
    for cause in causes:
        if isinstance(cause, HanyeongError):
            raise cause
    for err, cause in zip(errors, causes):
        if isinstance(err, ray.exceptions.RayActorError):
            raise _GroupLost(err)
        if _peer_lost(cause):
            raise _GroupLost(cause)
    cause = causes[0]
    raise cause if isinstance(cause, BaseException) else errors[0]


def _peer_lost(error: BaseException | None) -> bool:
    """MLX's ring raises RuntimeError("[ring] connection to a peer was lost") in the ranks that
    outlive a dead one; Ray may report the death itself later than that."""
    return isinstance(error, RuntimeError) and "[ring]" in str(error)
