"""MLX data parallelism across Macs: the pure parts of the ring (bundles of the ring launcher,
the hostfile and rank environment of mlx_model/parallel.py); and, with MLX's ring backend over
127.0.0.1 (it runs on the Linux CPU build too), DATA-PARALLEL LAW: two ranks stepping on their rows
of each global batch end on the weights and losses of one process stepping on the whole batch; then
a whole stage through Ray: run_ring_group (orchestration/cluster/ring_group.py) on a local Ray
declaring two `apple_silicon` gives the single worker's loss curve and checkpoint.

What no test here covers: real Macs, Metal, a ring across machines (Thunderbolt or Ethernet).

The ranks of the law run as subprocesses of this module (`python -m tests.mlx_model.test_distributed
RANK HOSTFILE OUT`): a process joins one ring for its life.
"""

# ruff: noqa: E402  (the imports below follow the importorskip that guards them)

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hanyeong.errors import ConfigError
from orchestration.cluster.ring_group import bundle_layout
from tests.orchestration.ray_cluster import free_ports

pytest.importorskip("mlx.core")
from mlx_model.parallel import rank_env, ring_hostfile  # noqa: E402  (imports mlx)

REPO = Path(__file__).resolve().parents[2]
MAC = {"CPU": 1, "apple_silicon": 1}  # one rank's resources, as the runner resolves them

# ---- pure: no Ray ------------------------------------------------------------------------------------


def test_the_hostfile_lists_one_address_per_rank_in_rank_order():
    hostfile = ring_hostfile([("10.0.0.2", 5000), ("10.0.0.1", 5000), ("10.0.0.1", 5001)])
    assert hostfile == [["10.0.0.2:5000"], ["10.0.0.1:5000"], ["10.0.0.1:5001"]]
    assert json.loads(json.dumps(hostfile)) == hostfile  # what MLX_HOSTFILE points to


@pytest.mark.parametrize("addresses, match", [
    ([("10.0.0.1", 5000)], "at least 2 ranks"),
    ([("10.0.0.1", 5000), ("10.0.0.1", 5000)], "same address"),
    ([("10.0.0.1", 5000), ("", 5000)], "rank 1"),
    ([("10.0.0.1", 0), ("10.0.0.2", 5000)], "rank 0"),
    ([("10.0.0.1", 5000), ("fe80::1", 5000)], "IPv4"),
])  # fmt: skip
def test_a_bad_ring_is_refused(addresses, match):
    with pytest.raises(ConfigError, match=match):
        ring_hostfile(addresses)


def test_the_rank_environment_is_what_the_ring_backend_reads(tmp_path):
    path = tmp_path / "h.json"
    assert rank_env(1, path) == {"MLX_RANK": "1", "MLX_HOSTFILE": str(path)}
    with pytest.raises(ConfigError):
        rank_env(-1, "h.json")


def test_one_bundle_per_rank_each_on_a_mac_spread():
    bundles, strategy = bundle_layout(3, {"CPU": 4, "apple_silicon": 1})
    assert bundles == [{"apple_silicon": 1, "CPU": 4}] * 3 and strategy == "SPREAD"
    assert bundle_layout(2, MAC)[0] == [MAC] * 2
    with pytest.raises(ConfigError, match="workers >= 2"):
        bundle_layout(1, MAC)


def test_the_backend_declares_a_ring_of_macs_and_refuses_fsdp():
    from orchestration.cluster.ring_group import run_ring_group
    from orchestration.cluster.resources import worker_resources
    from orchestration.core.backends import capabilities

    caps = capabilities("mlx")
    assert (caps.launcher, caps.parallelisms, caps.device_resource) == ("ring", ("ddp",), "apple_silicon")
    assert worker_resources("mlx", {}, {"CPU": 8, "apple_silicon": 2}, 8, workers=2) == MAC
    with pytest.raises(ConfigError, match="parallel must be one of ddp on backend mlx, got 'fsdp'"):
        run_ring_group({"backend": "mlx"}, 2, "fsdp", MAC, retries=0)


# ---- the ring on this machine -----------------------------------------------------------------------

STEPS = 3  # steps before the checkpoint; one more after resuming from it
ROWS, T = 5, 16  # an odd global batch: the ranks hold 3 and 2 rows


def optim():
    from orchestration.core.optim import OptimConfig

    return OptimConfig(lr=3e-3, warmup_steps=1, total_steps=STEPS + 1, grad_accum_steps=2)


def global_batches():
    """STEPS + 1 global batches of the tiny model's vocabulary, with masks (the sft loss divides by
    the counted targets, which differ between the ranks)."""
    from orchestration.core.batch import Batch
    from tests.mlx_model.conftest import VOCAB

    rng = np.random.default_rng(7)
    for _ in range(STEPS + 1):
        tokens = rng.integers(0, VOCAB, (ROWS, T + 1))
        yield Batch.from_tokens(tokens, loss_mask=rng.random((ROWS, T + 1)) < 0.6)


def sft_counted(model, batch):
    """sft with a summed metric of its own (as the preference losses have): its counted targets, so
    the step's mean of it over the global batch's is 1 only if it was summed over the ranks."""
    from mlx_model.losses import sft

    summed, n = sft(model, batch)
    return summed, n, {"counted": n}


def train(out: Path, rank: int = 0, world: int = 1) -> None:
    """The law's run, alone (world 1) or as one rank: steps, a checkpoint every rank calls, a resume
    from it on every rank, one more step; metrics and weights to OUT/rank<r>.{json,npz}."""
    from mlx_model.losses import LOSS_READS, LOSSES, register_loss

    registered = "test_sft_counted" not in LOSSES  # unregistered after: the registries are compared
    if registered:
        register_loss("test_sft_counted", sft_counted, reads=("inputs", "targets", "loss_mask"))
    try:
        _train(out, rank, world)
    finally:
        if registered:
            del LOSSES["test_sft_counted"], LOSS_READS["test_sft_counted"]


def _train(out: Path, rank: int, world: int) -> None:
    from mlx.utils import tree_flatten

    from mlx_model.backend import MLXBackend
    from orchestration.core.parallel import rank_rows
    from tests.mlx_model.conftest import tiny

    backend, parallel = MLXBackend(), "ddp" if world > 1 else None
    # rank 1 starts from other weights: the group must begin from rank 0's
    model = backend.init(tiny(), seed=rank)
    state = backend.init_train_state(model, optim(), seed=0, parallel=parallel)
    metrics = []
    for i, batch in enumerate(global_batches()):
        if i == STEPS:
            backend.save(state.model, out / "ckpt", state)
            state = backend.load_train_state(out / "ckpt", parallel=parallel)
        loss = "test_sft_counted" if i % 2 else "sft"  # with and without metrics of the loss's own
        metrics.append(backend.train_step(state, rank_rows(batch, rank, world), loss=loss))
    (out / f"rank{rank}.json").write_text(json.dumps({"metrics": metrics, "world": backend.world(),
                                                      "tokens_seen": state.tokens_seen}))  # fmt: skip
    weights = {k: np.array(v) for k, v in tree_flatten(state.model.parameters())}
    np.savez(out / f"rank{rank}.npz", **weights)


def run_ranks(out: Path, world: int, timeout: float = 240) -> None:
    """`world` subprocesses of this module joined in a ring on 127.0.0.1."""
    hostfile = out / "hostfile.json"
    hostfile.write_text(json.dumps(ring_hostfile([("127.0.0.1", p) for p in free_ports(world)])))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.mlx_model.test_distributed", str(out)],
                              env={**env, **rank_env(r, hostfile)}, cwd=REPO, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]  # fmt: skip
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for r, (p, text) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {r} exited {p.returncode}:\n{text[-3000:]}"


@pytest.mark.mlx
def test_data_parallel_law_two_ranks_step_as_one_process_on_the_whole_batch(tmp_path):
    pytest.importorskip("mlx.core")
    alone, ranks = tmp_path / "alone", tmp_path / "ranks"
    alone.mkdir(), ranks.mkdir()
    train(alone)
    run_ranks(ranks, 2)
    one = json.loads((alone / "rank0.json").read_text())
    for r in range(2):
        got = json.loads((ranks / f"rank{r}.json").read_text())
        assert got["world"] == [r, 2]
        assert got["tokens_seen"] == one["tokens_seen"] == (STEPS + 1) * ROWS * T
        assert 0 < sum("counted" in m for m in got["metrics"]) < len(got["metrics"])
        for a, b in zip(got["metrics"], one["metrics"], strict=True):  # the global batch's metrics
            for key in ("tokens", "counted_tokens", "lr"):
                assert a[key] == b[key], key
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
            assert a.get("counted", 1.0) == b.get("counted", 1.0) == 1.0  # a loss's metrics: summed over the ranks
    expected, w0, w1 = (np.load(d / f"rank{r}.npz") for d, r in ((alone, 0), (ranks, 0), (ranks, 1)))
    for name in expected.files:
        np.testing.assert_array_equal(w0[name], w1[name], err_msg=name)  # the ranks never drift apart
        np.testing.assert_allclose(w0[name], expected[name], rtol=0, atol=1e-6, err_msg=name)
    # rank 0 wrote the checkpoint both ranks resumed from: the state after STEPS steps
    assert json.loads((ranks / "ckpt" / "trainer_state.json").read_text())["step"] == STEPS


# ---- a stage through Ray -----------------------------------------------------------------------------

STAGE_DEPS = bool(importlib.util.find_spec("torch") and importlib.util.find_spec("mlx"))
if STAGE_DEPS:
    # the tiny tokenizer's datasets and recipe of the stage tests (that module needs torch)
    from tests.orchestration.test_stage import datasets, metrics, recipe_tables, request  # noqa: F401

needs_stage = pytest.mark.skipif(not STAGE_DEPS, reason="needs MLX, and torch for the stage tests' fixtures")
BUDGET = 768  # 6 steps of 4 rows x 32 tokens


@pytest.fixture(scope="module")
def mlx_ray():
    """A local Ray on 127.0.0.1 that declares two Macs' worth of `apple_silicon` (one node)."""
    from orchestration.cluster.ray_session import ray_session

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")  # the ranks share 2 cores
        with ray_session(num_cpus=2, resources={"apple_silicon": 2}) as ray:
            assert ray.cluster_resources().get("apple_silicon") == 2, "another Ray is initialised here"
            yield ray


def stage_config(tokenizer, datasets, stage_dir: Path, **changes) -> dict:
    tables = recipe_tables(tokenizer, datasets, token_budget=BUDGET, seq_len=32, batch_tokens=128,
                           checkpoint_every_tokens=256, seq_len_ramp=[], batch_ramp=[], **changes)  # fmt: skip
    return {**request(tables, 0, stage_dir, tokenizer, datasets), "backend": "mlx"}


def attempts(stage_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "attempts.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(small_tokenizer_dir, datasets, tmp_path_factory):
    """The stage on one worker, in this process: (stage dir, result)."""
    from orchestration.pipeline.stage import run_stage

    stage_dir = tmp_path_factory.mktemp("single") / "pretrain"
    return stage_dir, run_stage(stage_config(small_tokenizer_dir, datasets, stage_dir))


def checkpoint_weights(stage_dir: Path) -> dict:
    from mlx_model.backend import read_tensors
    from orchestration.core.checkpoint import MODEL_FILE

    return {k: np.array(v) for k, v in read_tensors(stage_dir / "checkpoint" / MODEL_FILE).items()}


@pytest.mark.mlx
@pytest.mark.ray
@needs_stage
def test_a_stage_on_two_mlx_ranks_through_ray_is_the_single_workers(
    mlx_ray, single, small_tokenizer_dir, datasets, tmp_path
):
    from orchestration.cluster.ring_group import run_ring_group

    stage_dir = tmp_path / "pretrain"
    config = stage_config(small_tokenizer_dir, datasets, stage_dir)
    # from inside a Ray task that only coordinates, as the runner calls it
    launcher = mlx_ray.remote(num_cpus=0, max_retries=0)(run_ring_group)
    result = mlx_ray.get(launcher.remote(config, 2, "ddp", MAC, retries=0))
    one_dir, one = single
    assert (result["tokens"], result["steps"]) == (one["tokens"], one["steps"]) == (BUDGET, 6)
    got, expected = metrics(stage_dir), metrics(one_dir)
    assert [x["step"] for x in got] == list(range(1, 7))  # rank 0 alone wrote the log
    assert [x["loss"] for x in got] == pytest.approx([x["loss"] for x in expected], rel=1e-5)
    assert [x["batch_rows"] for x in got] == [4] * 6  # the global batch's shape, not a rank's
    # AdamW divides by sqrt(v): on rows of rare tokens a rounding difference of the summed gradient
    # (another summation order) moves a weight by up to ~1e-6 of the ~3e-3 a step moves it
    weights, single_weights = checkpoint_weights(stage_dir), checkpoint_weights(one_dir)
    for name, value in single_weights.items():
        np.testing.assert_allclose(weights[name], value, rtol=0, atol=1e-5, err_msg=name)
    assert sorted(a["rank"] for a in attempts(stage_dir)) == [0, 1]
    assert not [p for p in mlx_ray.util.placement_group_table().values() if p["state"] != "REMOVED"]


@pytest.mark.mlx
@pytest.mark.ray
@needs_stage
def test_a_ranks_exception_is_raised_as_it_is_and_not_retried(
    mlx_ray, small_tokenizer_dir, datasets, tmp_path
):
    from orchestration.cluster.ring_group import run_ring_group

    config = stage_config(small_tokenizer_dir, datasets, tmp_path / "s")
    config["recipe"]["run"]["vocab_size"] = 4000  # not the tokenizer's: every rank raises ConfigError
    with pytest.raises(ConfigError, match="vocab_size 4,000"):
        run_ring_group(config, 2, "ddp", MAC, retries=2)
    assert sorted(a["rank"] for a in attempts(tmp_path / "s")) == [0, 1]  # one start of the group


@pytest.mark.mlx
@pytest.mark.ray
@needs_stage
def test_a_killed_rank_restarts_the_group_which_resumes_to_the_single_workers_weights(
    mlx_ray, single, small_tokenizer_dir, datasets, tmp_path, monkeypatch
):
    import signal
    import threading
    import time

    from orchestration.cluster import ring_group

    monkeypatch.setattr(ring_group, "FAILURE_GRACE_S", 2.0)  # rank 0 waits on its dead peer this long
    stage_dir, killed = tmp_path / "pretrain", []
    log = stage_dir / "metrics.jsonl"

    def kill_rank_1_after_a_step():  # SIGKILL: a Mac gone mid-stage, no Python exception anywhere
        deadline = time.monotonic() + 120
        while not killed and time.monotonic() < deadline:
            lines = log.read_text().splitlines() if log.exists() else []
            if lines:
                pid = next(a["pid"] for a in attempts(stage_dir) if a["rank"] == 1)
                os.kill(pid, signal.SIGKILL)
                killed.append(len(lines))
            time.sleep(0.005)

    watcher = threading.Thread(target=kill_rank_1_after_a_step)
    watcher.start()
    try:
        result = ring_group.run_ring_group(stage_config(small_tokenizer_dir, datasets, stage_dir), 2, "ddp",
                                           MAC, retries=1)  # fmt: skip
    finally:
        watcher.join()
    assert killed and killed[0] < 6, "rank 1 was not killed mid-stage"
    assert sorted(a["rank"] for a in attempts(stage_dir)) == [0, 0, 1, 1]  # the group started twice
    assert result["tokens"] == BUDGET and [x["step"] for x in metrics(stage_dir)] == list(range(1, 7))
    weights = checkpoint_weights(stage_dir)
    for name, value in checkpoint_weights(single[0]).items():
        np.testing.assert_allclose(weights[name], value, rtol=0, atol=1e-5, err_msg=name)


@pytest.mark.slow  # ~1 min here: three `ray start` nodes
@pytest.mark.mlx
@pytest.mark.ray
@needs_stage
def test_on_a_cluster_of_two_mac_nodes_each_holds_one_rank(single, small_tokenizer_dir, datasets, tmp_path):
    """Three Ray nodes (`ray start`, on loopback): a head without Macs and two nodes with one
    `apple_silicon` each: one rank per node, the ring between the nodes, the single worker's stage."""
    from tests.orchestration.ray_cluster import LocalCluster

    stage_dir = tmp_path / "pretrain"
    (tmp_path / "config.json").write_text(json.dumps(stage_config(small_tokenizer_dir, datasets, stage_dir)))
    with LocalCluster(num_cpus=1, env={"OMP_NUM_THREADS": "1"}) as cluster:
        for _ in range(2):
            cluster.add_worker(num_cpus=1, resources={"apple_silicon": 1})
        # a driver of its own: this process may hold the local Ray of the other tests
        done = subprocess.run([sys.executable, "-m", "tests.mlx_model.test_distributed", "launch", cluster.address,
                               str(tmp_path)], env={**cluster.client_env(), "RAY_AUTH_MODE": "token", "PYTHONPATH": str(REPO)}, cwd=REPO,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    ranks = attempts(stage_dir)
    assert sorted(a["rank"] for a in ranks) == [0, 1] and len({a["node"] for a in ranks}) == 2
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["tokens"] == BUDGET
    assert [x["loss"] for x in metrics(stage_dir)] == pytest.approx([x["loss"] for x in metrics(single[0])], rel=1e-5)


if __name__ == "__main__" and sys.argv[1] == "launch":  # the driver of the cluster test
    from orchestration.cluster.ray_session import ray_session
    from orchestration.cluster.ring_group import run_ring_group

    address, out = sys.argv[2], Path(sys.argv[3])
    with ray_session(address=address):
        result = run_ring_group(json.loads((out / "config.json").read_text()), 2, "ddp", MAC, retries=0)
    (out / "result.json").write_text(json.dumps(result))
elif __name__ == "__main__":  # one rank of run_ranks: MLX_RANK and MLX_HOSTFILE are set
    import mlx.core as mx

    mx.distributed.init(backend="ring", strict=True)
    group = mx.distributed.init()
    train(Path(sys.argv[1]), group.rank(), group.size())
