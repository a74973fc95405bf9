"""A multi-worker MLX stage: one rank per Mac, placed by a Ray placement group, joined by
`mx.distributed`'s ring backend (TCP; Thunderbolt or Ethernet), data-parallel (mlx_model/parallel.py).

    run_mlx_workers(config, workers, resources, retries)     inside the stage's Ray task (num_cpus=0)

1. A placement group of `workers` bundles {"apple_silicon": 1, "CPU": cpus}, strategy SPREAD. A Mac
   declares one `apple_silicon` (`ray start --resources='{"apple_silicon": 1}'`), so that resource
   alone already puts one rank per Mac; SPREAD (not STRICT_SPREAD) still lets a node that declares
   several (a test machine, a Mac Studio asked to run 2 ranks) hold several ranks, where
   STRICT_SPREAD would never be placed.
2. One `_Rank` actor per bundle reports its node's address (HANYEONG_MLX_RING_IP when the node's
   environment sets it, e.g. a Thunderbolt-bridge IP, else Ray's node IP) and a free TCP port.
3. The ring hostfile is built from them in bundle order (rank r = bundle r): `ring_hostfile`. Each
   actor writes it to a temporary file, sets `rank_env` and calls
   `mx.distributed.init(backend="ring", strict=True)` (given JOIN_TIMEOUT_S: MLX waits forever
   for a rank it cannot reach); then each notes its attempt in STAGE_DIR/attempts.jsonl and runs
   `run_stage({**config, "workers": workers, "parallel": "ddp"})`.
4. Rank 0's result is the stage's. An actor that dies (ActorDiedError: its process or its Mac is
   gone; or a rank whose ring lost its peer) tears the whole group down and starts it again, up to
   `retries` times; run_stage resumes from the last checkpoint. A Python exception of a rank
   (HanyeongError, or any other) is raised as it is, not retried.

Every Mac must see the run directory, the datasets and the tokenizer at the same paths (shared
storage): all ranks read the same checkpoint and rank 0 alone writes it.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from pathlib import Path

from hanyeong.errors import ConfigError, HanyeongError

RING_IP_ENV = "HANYEONG_MLX_RING_IP"  # a node's address for the ring, where not Ray's node IP
PLACEMENT_TIMEOUT_S = 600.0  # how long the ranks may wait for enough free Macs
JOIN_TIMEOUT_S = 120.0  # how long the ranks may take to connect their ring (MLX itself waits forever)
FAILURE_GRACE_S = 10.0  # after a rank fails, how long to wait for the others' own outcome


# ---- pure: the layout, the hostfile, the environment ---------------------------------------------


def bundle_layout(workers: int, resources: dict) -> tuple[list[dict], str]:
    """The placement group: one bundle per rank ({"apple_silicon": 1, "CPU": cpus}) and its strategy.
    `resources` are one worker's: Ray's ({"CPU": 2, "apple_silicon": 1}) or [stage.resources]'
    ({"cpus": 2}); one CPU when neither says."""
    if workers < 2:
        raise ConfigError(f"run_mlx_workers needs workers >= 2, got {workers}; one worker is a plain "
                          "stage task")  # fmt: skip
    cpus = resources.get("CPU", resources.get("cpus", 1))
    if not (isinstance(cpus, int | float) and cpus > 0):
        raise ConfigError(f"[stage.resources] cpus must be a positive number, got {cpus!r}")
    return [{"apple_silicon": 1, "CPU": cpus} for _ in range(workers)], "SPREAD"


def ring_hostfile(addresses: list[tuple[str, int]]) -> list[list[str]]:
    """MLX_HOSTFILE's content for the ring backend: rank r listens on addresses[r] = (ip, port).

    A JSON list with one list of "ip:port" per rank (mlx.launch writes the same); rank r connects to
    rank r+1's address and accepts rank r-1's connection, so each port must be reachable from the
    previous rank's Mac."""
    if len(addresses) < 2:
        raise ConfigError(f"a ring needs at least 2 ranks, got {len(addresses)}")
    out = []
    for rank, (ip, port) in enumerate(addresses):
        if not ip or ":" in ip or not isinstance(port, int) or not 0 < port < 65536:
            raise ConfigError(f"rank {rank}: {ip!r}:{port!r} is not an IPv4 address and TCP port "
                              "for the ring")  # fmt: skip
        out.append([f"{ip}:{port}"])
    if len({a[0] for a in out}) != len(out):
        raise ConfigError(f"two ranks would listen on the same address: {out}")
    return out


def rank_env(rank: int, hostfile_path: str | Path) -> dict[str, str]:
    """The environment `mx.distributed.init(backend="ring")` reads: this rank and the hostfile."""
    if rank < 0:
        raise ConfigError(f"rank must be >= 0, got {rank}")
    return {"MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile_path)}


# ---- one rank -----------------------------------------------------------------------------------


class _Rank:
    """A Ray actor (one per bundle): a process that joins the ring once and runs its rank of the
    stage."""

    def address(self) -> tuple[str, int]:
        """(ip, port) this rank will listen on: a port free on that address now (the ring binds it
        a moment later)."""
        import ray

        ip = os.environ.get(RING_IP_ENV) or ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((ip, 0))
            self.ring = f"{ip}:{s.getsockname()[1]}"
            return ip, s.getsockname()[1]

    def join(self, hostfile: list[list[str]], rank: int) -> tuple[int, int]:
        """Join the ring as `rank`; returns (rank, size) once every rank is connected."""
        import mlx.core as mx

        with tempfile.NamedTemporaryFile("w", prefix="ring-", suffix=".json", delete=False) as f:
            json.dump(hostfile, f)
        os.environ.update(rank_env(rank, f.name))
        try:
            group = mx.distributed.init(backend="ring", strict=True)
        finally:
            os.unlink(f.name)
        return group.rank(), group.size()

    def run(self, config: dict, workers: int, rank: int) -> dict:
        import ray

        from orchestration.pipeline.stage import run_stage

        note = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "rank": rank,
                "node": ray.get_runtime_context().get_node_id(), "ring": getattr(self, "ring", None)}  # fmt: skip
        stage_dir = Path(config["stage_dir"])
        stage_dir.mkdir(parents=True, exist_ok=True)
        with open(stage_dir / "attempts.jsonl", "a", encoding="utf-8") as out:
            out.write(json.dumps(note) + "\n")
        return run_stage({**config, "workers": workers, "parallel": "ddp"})


class _GroupLost(Exception):
    """A rank's process or Mac is gone (Ray's ActorDiedError, or a rank that lost its ring peer)."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


# ---- the launcher -------------------------------------------------------------------------------


def run_mlx_workers(config: dict, workers: int, resources: dict, retries: int) -> dict:
    """Run stage `config` on `workers` MLX ranks (see the module doc); rank 0's run_stage result."""
    import ray

    bundles, strategy = bundle_layout(workers, resources)
    for attempt in range(retries + 1):
        try:
            return _attempt(ray, config, workers, bundles, strategy)
        except _GroupLost as lost:
            if attempt == retries:
                raise lost.error from None
    raise AssertionError("unreachable")


def _attempt(ray, config: dict, workers: int, bundles: list[dict], strategy: str) -> dict:
    """One start of the group: place, join, run; everything it started is gone when it returns."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg = placement_group(bundles, strategy=strategy)
    actors = []
    try:
        ready, _ = ray.wait([pg.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            raise ConfigError(f"could not place {len(bundles)} MLX ranks ({bundles[0]} each) within "
                              f"{PLACEMENT_TIMEOUT_S:.0f} s: the cluster has {ray.cluster_resources()}; "
                              "each Mac joins with `ray start --address ... --resources='{\"apple_silicon\": 1}'`")  # fmt: skip
        rank_actor = ray.remote(max_restarts=0)(_Rank)  # a dead rank is restarted with its whole group
        for i, bundle in enumerate(bundles):
            strategy_i = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)
            actors.append(rank_actor.options(num_cpus=bundle["CPU"], resources={"apple_silicon": 1},
                                             scheduling_strategy=strategy_i).remote())  # fmt: skip
        hostfile = ring_hostfile([tuple(a) for a in ray.get([a.address.remote() for a in actors])])
        joined = [a.join.remote(hostfile, rank) for rank, a in enumerate(actors)]
        ready, _ = ray.wait(joined, num_returns=len(joined), timeout=JOIN_TIMEOUT_S)
        if len(ready) < len(joined):
            _outcome(ray, ready)  # a rank that failed to join says why
            ports = ", ".join(h[0] for h in hostfile)
            raise ConfigError(f"the {workers} MLX ranks did not connect their ring within "
                              f"{JOIN_TIMEOUT_S:.0f} s ({ports}): each Mac must accept TCP on its rank's port from the previous "
                              f"rank's Mac (firewall); set {RING_IP_ENV} on a node whose Ray IP is not the "
                              "one to use")  # fmt: skip
        groups = _outcome(ray, joined)
        if groups != [(rank, workers) for rank in range(workers)]:
            raise ConfigError(f"the ring made ranks {groups}, expected {workers} ranks in bundle order")
        return _outcome(ray, [a.run.remote(config, workers, rank) for rank, a in enumerate(actors)])[0]
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        remove_placement_group(pg)


def _outcome(ray, refs: list) -> list[dict]:
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
