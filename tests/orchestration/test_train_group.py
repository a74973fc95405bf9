"""A stage on 2 PyTorch workers through a real local Ray and Ray Train V2's TorchTrainer
(orchestration/cluster/train_group.py; gloo on 127.0.0.1): the loss curve and weights of 1 worker on
the same global batches; a worker SIGKILLed after the first checkpoint is survived with the resume
law (the weights of an uninterrupted 2-worker run, each step logged once, tokens == budget); a
stage error is not retried and reads as itself. The same stage with FSDP2 runs on 2 spawned ranks
without Ray, joined through the backend protocol as the Ray workers join."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from orchestration.core import checkpoint
from hanyeong.errors import ConfigError, DataError, HanyeongError
from orchestration.pipeline.stage import run_stage
from orchestration.cluster.train_group import absolute, group_failure, stage_error

torch = pytest.importorskip("torch")
pytest.importorskip("ray.train")
# the tiny two-stage recipe, its datasets and its 1-worker run, shared with run_stage's own tests
from tests.orchestration.test_stage import (  # noqa: E402, F401
    datasets,
    metrics,
    pretrained,
    request,
    weights,
)

from tests.cuda_model.test_parallel import spawn  # noqa: E402

WORKERS = 2


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray of 2 CPUs on 127.0.0.1 for the module; its workers run torch on one thread."""
    from orchestration.cluster.ray_session import ray_session

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        with ray_session(num_cpus=2) as session:
            yield session


def on_workers(ray, config: dict, parallel: str = "ddp", retries: int = 2):
    """run_train_group in a Ray task that holds no CPU, as the runner calls it; its ObjectRef."""
    from orchestration.cluster.train_group import run_train_group

    task = ray.remote(num_cpus=0, max_retries=0)(run_train_group)
    return task.remote(config, WORKERS, parallel, {"CPU": 1}, retries)  # as the runner passes it


def attempts(stage_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (stage_dir / "attempts.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_workers(ray_local, pretrained, small_tokenizer_dir, datasets, tmp_path_factory):
    """The pretraining stage of test_stage on 2 DDP workers, uninterrupted: (stage dir, result)."""
    tables = pretrained[0]
    stage_dir = tmp_path_factory.mktemp("workers") / "pretrain"
    config = request(tables, 0, stage_dir, small_tokenizer_dir, datasets)
    return stage_dir, ray_local.get(on_workers(ray_local, config), timeout=600)


def follows_one_worker(pretrained, stage_dir: Path, result: dict) -> None:
    """The stage's metrics and checkpoint are those of the 1-worker run (fp tolerance)."""
    _, one_dir, one = pretrained
    assert result["tokens"] == one["tokens"] == 15_360 and result["steps"] == one["steps"]
    assert Path(result["checkpoint"]) == stage_dir / "checkpoint"
    lines, expected = metrics(stage_dir), metrics(one_dir)
    assert [x["step"] for x in lines] == [x["step"] for x in expected]
    for got, want in zip(lines, expected):
        for key in ("tokens", "seq_len", "batch_rows", "counted_tokens", "lr"):
            assert got[key] == want[key], key
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
    a, b = weights(result["checkpoint"]), weights(one["checkpoint"])
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=5e-5, rtol=0, err_msg=key)
    state = checkpoint.read_trainer_state(result["checkpoint"])
    assert state["data_cursor"] == checkpoint.read_trainer_state(one["checkpoint"])["data_cursor"]


@pytest.mark.ray
def test_two_workers_follow_the_loss_curve_and_weights_of_one(pretrained, two_workers):
    stage_dir, result = two_workers
    follows_one_worker(pretrained, stage_dir, result)
    assert sorted(a["rank"] for a in attempts(stage_dir)) == [0, 1]  # one start per rank, no retry


def join_local_group(rank: int, world: int, address):
    """Join a torch group as a Ray Train worker does, through the backend: bind the device, rank 0
    opens the rendezvous on 127.0.0.1 and sends it through `address` (a queue). (backend, device)."""
    from orchestration.core.backends import get_backend

    device = get_backend("torch").bind_device(accelerator=False, cpus=1)
    backend = get_backend("torch", device=device)
    if rank == 0:
        rendezvous = backend.open_rendezvous("127.0.0.1")
        for _ in range(world - 1):
            address.put(rendezvous)
    else:
        rendezvous = address.get()
    backend.join_group(rank, world, rendezvous)
    return backend, device


def fsdp_rank(rank: int, world: int, address, config: dict) -> None:
    """What a Ray Train worker does (train_group.train_loop), in a spawned process: bind the device,
    join the group through the backend (rank 0's rendezvous on 127.0.0.1, sent through `address`),
    run the stage as a rank, leave."""
    backend, device = join_local_group(rank, world, address)
    assert backend.world() == (rank, world) and device == "cpu"
    result = run_stage({**config, "workers": world, "parallel": "fsdp", "device": device})
    if rank == 0:
        (Path(config["stage_dir"]) / "result.json").write_text(json.dumps(result))
    backend.leave_group()
    assert backend.world() == (0, 1)


def test_fsdp_ranks_follow_the_loss_curve_and_weights_of_one(
    pretrained, small_tokenizer_dir, datasets, tmp_path
):
    stage_dir = tmp_path / "pretrain"
    spawn(fsdp_rank, WORKERS, request(pretrained[0], 0, stage_dir, small_tokenizer_dir, datasets))
    follows_one_worker(pretrained, stage_dir, json.loads((stage_dir / "result.json").read_text()))
    # the ranks wrote their pieces; the stage's end consolidated the weights beside them
    final = stage_dir / "checkpoint"
    assert checkpoint.is_sharded(final) and checkpoint.has_weights_file(final)
    assert len(checkpoint.sharded_files(checkpoint.verify(final, checksums=True))) == WORKERS


@pytest.mark.ray
def test_a_killed_worker_is_survived_with_the_resume_law(
    ray_local, two_workers, pretrained, small_tokenizer_dir, datasets, tmp_path
):
    reference_dir, reference = two_workers
    stage_dir = tmp_path / "pretrain"
    config = request(pretrained[0], 0, stage_dir, small_tokenizer_dir, datasets)
    killed = []

    def kill_rank_0_after_the_first_checkpoint():
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            if (stage_dir / "checkpoint" / checkpoint.INDEX_FILE).is_file():
                pid = next(a["pid"] for a in attempts(stage_dir) if a["rank"] == 0)
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.005)

    watcher = threading.Thread(target=kill_rank_0_after_the_first_checkpoint, daemon=True)
    watcher.start()
    result = ray_local.get(on_workers(ray_local, config), timeout=600)
    watcher.join()
    assert killed
    starts = attempts(stage_dir)
    rank0 = [a for a in starts if a["rank"] == 0]
    assert len(rank0) == 2 and rank0[0]["pid"] == killed[0] != rank0[1]["pid"]
    assert len(starts) == 2 * WORKERS  # the whole group started again, once
    assert result["resumed_from_step"] and result["tokens"] == 15_360 == reference["tokens"]
    steps = [x["step"] for x in metrics(stage_dir)]
    assert steps == list(range(1, reference["steps"] + 1))  # the steps after the checkpoint, once
    a, b = weights(result["checkpoint"]), weights(reference["checkpoint"])
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.ray
def test_a_stage_error_is_not_retried_and_reads_as_itself(
    ray_local, pretrained, small_tokenizer_dir, datasets, tmp_path
):
    from orchestration.pipeline.runner import failure_message

    stage_dir = tmp_path / "pretrain"
    elsewhere = {"elsewhere": datasets["general"]}  # not the name the recipe reads
    config = request(pretrained[0], 0, stage_dir, small_tokenizer_dir, elsewhere)
    with pytest.raises(ray_local.exceptions.RayTaskError) as caught:
        ray_local.get(on_workers(ray_local, config, retries=3), timeout=600)
    assert isinstance(caught.value.cause, ConfigError)
    line = failure_message(caught.value)
    assert line.startswith("run_stage: datasets has no directory for 'general'") and "\n" not in line
    assert sorted(a["rank"] for a in attempts(stage_dir)) == [0, 1]  # one attempt: no retry


# ---- the pure parts -------------------------------------------------------------------------------


def test_a_rank_error_stops_the_stage_unless_a_worker_died():
    from ray.exceptions import ActorDiedError

    data, other = DataError("bad shard"), RuntimeError("gloo: connection reset")
    assert stage_error({1: other, 0: data}) is data
    assert stage_error({0: data, 1: ActorDiedError()}) is None  # a killed rank: retried
    assert stage_error({0: other}) is None
    assert isinstance(stage_error({0: ConfigError("x"), 1: data}), HanyeongError)


def test_a_group_that_kept_failing_is_one_line_naming_the_rank_that_died():
    from ray.exceptions import ActorDiedError

    fallout = RuntimeError("[gloo/pair.cc:537] Read error: Connection reset by peer\nmore")
    line = group_failure({0: fallout, 1: ActorDiedError()}, 2, 3, "torch")
    assert line.startswith("the 2 torch workers failed 4 times (Ray Train retries: 3); "
                           "the last time rank 1 died (ActorDiedError: ")  # fmt: skip
    assert "gloo" not in line and "\n" not in line
    assert group_failure({0: fallout}, 2, 0, "torch").endswith(
        "failed once (Ray Train retries: 0); the last time rank 0: "
        "RuntimeError: [gloo/pair.cc:537] Read error: Connection reset by peer"
    )


def test_a_group_needs_two_workers_and_a_parallelism_of_its_backend():
    from orchestration.cluster.train_group import run_train_group

    with pytest.raises(ConfigError, match="workers >= 2"):
        run_train_group({"backend": "torch"}, 1, "ddp", {"CPU": 1}, 0)
    with pytest.raises(ConfigError, match="parallel must be one of ddp, fsdp on backend torch, got 'tp'"):
        run_train_group({"backend": "torch"}, 2, "tp", {"CPU": 1}, 0)


def test_paths_are_made_absolute():
    config = absolute({"stage_dir": "run/s", "tokenizer": "tok", "init_from": None,
                       "datasets": {"d": "data"}})  # fmt: skip
    paths = (config["stage_dir"], config["tokenizer"], config["datasets"]["d"])
    assert all(Path(p).is_absolute() for p in paths)
    assert config["init_from"] is None
