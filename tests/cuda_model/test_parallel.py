"""Data parallelism law: 2 ranks (gloo on 127.0.0.1, spawned processes, no Ray) each training on
their rows of a global batch take the steps of 1 process on the whole batch: same losses, grad
norms, token counts and weights (fp tolerance), for DDP and FSDP2, with gradient accumulation, an
SFT loss_mask, uneven rows (5 on 2 ranks) and a rank with no rows at all, and with activation
checkpointing on the ranks only. A 2-rank checkpoint is the single-process one (a single process
loads it), and 2 ranks resume a single-process checkpoint. FSDP ranks write the sharded layout (each
its pieces); consolidated it is the single-process checkpoint, and one process, 2 FSDP ranks and 2
DDP ranks all resume it as they would the single-file one."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from orchestration.core.batch import Batch
from hanyeong.errors import CheckpointError
from orchestration.core.checkpoint import (
    MODEL_FILE,
    OPTIMIZER_FILE,
    SHARDED_DIR,
    has_training_state,
    is_sharded,
    read_trainer_state,
    verify,
)
from orchestration.core.optim import OptimConfig
from orchestration.core.parallel import rank_rows
from tests.cuda_model.conftest import tiny
from tests.orchestration.test_stage import one_thread  # noqa: F401  (a fixture)

WORLD, T = 2, 12
OPTIM = OptimConfig(lr=3e-3, warmup_steps=1, total_steps=6, weight_decay=0.1, grad_clip=0.5, eps=1e-6)
# name: (parallel, tied, loss, rows, grad_accum_steps, steps[, activation checkpointing on the ranks])
CASES = {
    "ddp": ("ddp", True, "causal_lm", 4, 1, 3),
    "ddp-sft-accum-uneven": ("ddp", False, "sft", 5, 2, 3),
    "ddp-one-row": ("ddp", True, "causal_lm", 1, 1, 2),  # rank 1 gets no rows
    "fsdp": ("fsdp", True, "causal_lm", 4, 1, 3),
    "fsdp-sft-accum-uneven": ("fsdp", False, "sft", 5, 2, 3),
    "fsdp-one-row": ("fsdp", False, "causal_lm", 1, 1, 2),
    "ddp-checkpointed": ("ddp", True, "causal_lm", 4, 1, 2, True),
    "fsdp-sft-accum-checkpointed": ("fsdp", False, "sft", 5, 2, 2, True),
}
RESUME = {"ddp-resume": "ddp", "fsdp-resume": "fsdp"}  # 2 steps in one process, 2 more on 2 ranks
RESUME_CASE = ("-", False, "sft", 5, 2, 4)
# one more step from the 2 FSDP ranks' sharded checkpoint of SHARDED_FROM, on 2 ranks laid out each way
SHARDED_FROM = "fsdp-sft-accum-uneven"
FROM_SHARDED = {"fsdp-from-sharded": "fsdp", "ddp-from-sharded": "ddp"}
# FSDP as on CUDA, on gloo: bf16 parameters gathered, fp32 gradient reduction, fused AdamW
MIXED = {"fsdp-bf16-fused": "fsdp-sft-accum-uneven", "fsdp-bf16-fused-tied": "fsdp"}


def spec_of(case):
    return tiny(tie_embeddings=case[1])


def batch_at(case, step: int) -> Batch:
    """The global batch of optimizer step `step`, the same in every process."""
    spec, rows = spec_of(case), case[3]
    rng = np.random.default_rng(100 + step)
    mask = (rng.random((rows, T + 1)) < 0.7).astype(np.float32) if case[2] == "sft" else None
    return Batch.from_tokens(rng.integers(0, spec.vocab_size, (rows, T + 1)), loss_mask=mask)


def optim_of(case) -> OptimConfig:
    return OptimConfig(**{**OPTIM.to_dict(), "grad_accum_steps": case[4]})


def train(backend, state, case, steps: int, rank: int = 0, world: int = 1) -> list[dict]:
    return [backend.train_step(state, rank_rows(batch_at(case, state.step), rank, world), loss=case[2])
            for _ in range(steps)]  # fmt: skip


# ---- the ranks (spawned processes) ----------------------------------------------------------------


def join(rank: int, world: int, address) -> None:
    """Join a gloo group on 127.0.0.1 as cuda_model/parallel.init_group does in the Ray workers:
    rank 0 serves the store on a loopback socket and sends its port through `address`."""
    from cuda_model import parallel

    torch.set_num_threads(1)
    if rank == 0:
        fd, port = parallel.listen("127.0.0.1")
        for _ in range(world - 1):
            address.put(port)
    else:
        fd, port = None, address.get()
    parallel.init_group(rank, world, "127.0.0.1", port, listen_fd=fd, timeout_s=120)


def rank_main(rank: int, world: int, address, out: str, start: str) -> None:
    """One rank: join the group, run every case, save (all ranks), rank 0 writes the metrics."""
    from cuda_model.backend import TorchBackend

    join(rank, world, address)
    backend, out = TorchBackend("cpu"), Path(out)
    runs = [(name, case, None) for name, case in CASES.items()]
    runs += [(name, (p, *RESUME_CASE[1:]), start) for name, p in RESUME.items()]
    grown = (*CASES[SHARDED_FROM][1:5], CASES[SHARDED_FROM][5] + 1)
    runs += [(name, (p, *grown), str(out / SHARDED_FROM)) for name, p in FROM_SHARDED.items()]
    runs += [(name, CASES[of], None) for name, of in MIXED.items()]
    for name, case, resume_from in runs:
        if resume_from is None:
            model = backend.init(spec_of(case), seed=7)
            recompute = len(case) > 6 and case[6]  # the single process's reference runs without it
            mixed = {"mixed_precision": True, "fused": True} if name in MIXED else {}
            state = backend.init_train_state(model, optim_of(case), seed=7, parallel=case[0],
                                             activation_checkpointing=recompute, **mixed)  # fmt: skip
            metrics = train(backend, state, case, case[5], rank, world)
        else:
            state = backend.load_train_state(resume_from, parallel=case[0])
            metrics = train(backend, state, case, case[5] - state.step, rank, world)
        state.data_cursor = {"after_step": state.step}
        backend.save(state.model, out / name, state)
        verify(out / name)  # every rank returns once rank 0's checkpoint is in place
        if rank == 0:
            (out / f"{name}.json").write_text(json.dumps(metrics))
    assert backend.world() == (rank, world)
    torch.distributed.destroy_process_group()


def spawn(fn, world: int, *args, timeout: float = 300) -> None:
    """Run fn(rank, world, address_queue, *args) on `world` spawned processes (see `join`); a rank's
    exception fails the caller, and so does a hang."""
    import torch.multiprocessing as mp

    address = mp.get_context("spawn").SimpleQueue()
    context = mp.start_processes(fn, args=(world, address, *args), nprocs=world, join=False,
                                 start_method="spawn")  # fmt: skip
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {world} ranks did not finish within {timeout:.0f} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


# ---- fixtures and laws ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single(one_thread, tmp_path_factory):
    """Every case in this process on the whole global batch: {name: (metrics, checkpoint)}, and the
    2-step checkpoint the resume cases start from."""
    from cuda_model.backend import TorchBackend

    backend, out = TorchBackend("cpu"), tmp_path_factory.mktemp("single")
    results = {}
    for name, case in {**CASES, "resume": RESUME_CASE}.items():
        state = backend.init_train_state(backend.init(spec_of(case), seed=7), optim_of(case), seed=7)
        if name == "resume":
            train(backend, state, case, 2)
            state.data_cursor = {"after_step": state.step}
            backend.save(state.model, out / "start", state)
        metrics = train(backend, state, case, case[5] - state.step)
        state.data_cursor = {"after_step": state.step}
        backend.save(state.model, out / name, state)
        results[name] = (metrics, out / name)
    results.update({name: results["resume"] for name in RESUME})
    case = CASES[SHARDED_FROM]
    state = backend.load_train_state(out / SHARDED_FROM)
    metrics = train(backend, state, case, 1)
    state.data_cursor = {"after_step": state.step}
    backend.save(state.model, out / "from-sharded", state)
    results.update({name: (metrics, out / "from-sharded") for name in FROM_SHARDED})
    return results, out / "start"


@pytest.fixture(scope="module")
def ranks(single, tmp_path_factory) -> Path:
    """The same cases on 2 ranks; their checkpoints and rank 0's metrics."""
    out = tmp_path_factory.mktemp("ranks")
    spawn(rank_main, WORLD, str(out), str(single[1]))
    return out


def tensors(ckpt: Path, file: str) -> dict[str, np.ndarray]:
    """A checkpoint's file; a sharded checkpoint's consolidated (once) into CKPT-single first."""
    if (ckpt / SHARDED_DIR).is_dir():
        from cuda_model.backend import TorchBackend

        single = ckpt.with_name(ckpt.name + "-single")
        if not single.is_dir():
            TorchBackend("cpu").consolidate(ckpt, single)
        ckpt = single
    return load_file(ckpt / file)


@pytest.mark.parametrize("name", [*CASES, *RESUME, *FROM_SHARDED])
def test_two_ranks_take_the_steps_of_one_process(single, ranks, name):
    expected, reference = single[0][name]
    got = json.loads((ranks / f"{name}.json").read_text())
    assert len(got) == len(expected) > 0
    for g, e in zip(got, expected):
        assert g["tokens"] == e["tokens"] and g["counted_tokens"] == e["counted_tokens"]
        assert g["lr"] == e["lr"]
        assert g["loss"] == pytest.approx(e["loss"], rel=1e-5)
        assert g["grad_norm"] == pytest.approx(e["grad_norm"], rel=1e-4)
    # gradients agree to fp32 rounding; Adam's g/sqrt(v) magnifies that where a gradient is near 0
    for file, atol in ((MODEL_FILE, 1e-5), (OPTIMIZER_FILE, 1e-6)):
        want, have = tensors(reference, file), tensors(ranks / name, file)
        assert want.keys() == have.keys()
        for key in want:
            np.testing.assert_allclose(have[key], want[key], atol=atol, rtol=1e-4, err_msg=key)
    meta, want_meta = read_trainer_state(ranks / name), read_trainer_state(reference)
    for key in ("step", "tokens_seen", "optim", "data_cursor", "seed", "backend"):
        assert meta[key] == want_meta[key], key


@pytest.mark.parametrize("name", MIXED)
def test_fsdp_in_bf16_with_fused_adamw_follows_fp32_within_bf16_error(single, ranks, name):
    """The CUDA setting of FSDP (bf16 copies for compute, fp32 gradient reduction, fp32 masters and
    moments, fused AdamW), run on gloo against the fp32 single process. Measured on this machine
    (3 steps, both cases): loss errors 1e-5..1.04e-4 relative, grad norms 7e-5..3.3e-3, where the
    fp32 FSDP run is within 8e-8 and 6e-8: the bounds are ~10x and ~6x the measured bf16 error, and
    the floor shows bf16 was in effect."""
    expected, _ = single[0][MIXED[name]]
    got = json.loads((ranks / f"{name}.json").read_text())
    assert [g["counted_tokens"] for g in got] == [e["counted_tokens"] for e in expected]
    loss = [abs(g["loss"] - e["loss"]) / e["loss"] for g, e in zip(got, expected)]
    norm = [abs(g["grad_norm"] - e["grad_norm"]) / e["grad_norm"] for g, e in zip(got, expected)]
    assert 1e-6 < max(loss) < 1e-3 and max(norm) < 2e-2, (loss, norm)


@pytest.mark.parametrize("name", [*CASES, *RESUME, *FROM_SHARDED])
def test_fsdp_ranks_write_their_pieces_and_ddp_one_file(ranks, name):
    """FSDP: one safetensors file of pieces per rank, no whole weights; DDP: the single-file layout."""
    parallel = {**{k: c[0] for k, c in CASES.items()}, **RESUME, **FROM_SHARDED}[name]
    files = verify(ranks / name)["files"]
    pieces = sorted(f for f in files if f.startswith(SHARDED_DIR + "/"))
    if parallel == "fsdp":
        assert len(pieces) == WORLD and MODEL_FILE not in files and OPTIMIZER_FILE not in files
        assert is_sharded(ranks / name) and has_training_state(ranks / name)
    else:
        assert not pieces and {MODEL_FILE, OPTIMIZER_FILE} <= set(files)


def test_a_consolidated_checkpoint_is_the_single_file_one_and_resumes_alike(single, ranks, tmp_path):
    """Full consolidation: model, moments and trainer state, resumable by one process with the
    single-file path; weights-only: the pieces stay (resumable) and model.safetensors joins them."""
    from cuda_model.backend import TorchBackend

    backend, case = TorchBackend("cpu"), CASES[SHARDED_FROM]
    full = backend.consolidate(ranks / SHARDED_FROM, tmp_path / "full")
    assert not is_sharded(full) and read_trainer_state(full) == read_trainer_state(ranks / SHARDED_FROM)
    partly = backend.consolidate(ranks / SHARDED_FROM, tmp_path / "weights", weights_only=True)
    assert is_sharded(partly) and not (partly / OPTIMIZER_FILE).exists()
    np.testing.assert_array_equal(load_file(partly / MODEL_FILE)["lm_head.weight"],
                                  load_file(full / MODEL_FILE)["lm_head.weight"])  # fmt: skip
    runs = [train(backend, backend.load_train_state(c), case, 2) for c in (full, partly, ranks / SHARDED_FROM)]
    for other in runs[1:]:
        assert [m["loss"] for m in other] == [m["loss"] for m in runs[0]]
    loaded = [backend.load(c).state_dict() for c in (full, ranks / SHARDED_FROM)]  # pieces read whole
    for key, value in loaded[0].items():
        torch.testing.assert_close(loaded[1][key], value, atol=0, rtol=0, msg=key)
    with pytest.raises(CheckpointError, match="not a sharded checkpoint"):
        backend.consolidate(full, tmp_path / "again")


@pytest.mark.parametrize("name", ["fsdp-sft-accum-uneven", "ddp"])
def test_a_two_rank_checkpoint_resumes_in_one_process(single, ranks, name):
    from cuda_model.backend import TorchBackend

    backend = TorchBackend("cpu")
    case = CASES[name]
    from_ranks = backend.load_train_state(ranks / name)
    from_single = backend.load_train_state(single[0][name][1])
    assert from_ranks.step == from_single.step == case[5] and from_ranks.parallel is None
    a, b = train(backend, from_ranks, case, 1), train(backend, from_single, case, 1)
    assert a[0]["loss"] == pytest.approx(b[0]["loss"], rel=1e-5)
    want = from_single.model.state_dict()
    for key, x in from_ranks.model.state_dict().items():
        torch.testing.assert_close(x, want[key], atol=1e-5, rtol=1e-4, msg=key)


def test_parallel_needs_a_process_group(backend):
    from hanyeong.errors import ConfigError

    assert backend.world() == (0, 1)
    with pytest.raises(ConfigError, match="process group"):
        backend.init_train_state(backend.init(tiny()), OPTIM, parallel="ddp")


def test_model_consolidate_on_the_command_line(ranks, tmp_path):
    from typer.testing import CliRunner

    from orchestration.cli import app

    out = tmp_path / "single"
    result = CliRunner().invoke(app, ["model", "consolidate", str(ranks / SHARDED_FROM), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}: single-file, 4 files" in result.output  # spec, model, optimizer, trainer state
    assert set(verify(out, checksums=True)["files"]) == {"spec.json", MODEL_FILE, OPTIMIZER_FILE, "trainer_state.json"}


def test_a_sharded_checkpoint_without_its_weights_is_one_clear_error_for_single_file_readers(ranks, tmp_path):
    """export-hf, averaging, the MLX backend read model.safetensors: they say how to get it."""
    import shutil

    from orchestration.core.export_hf import export_hf

    with pytest.raises(CheckpointError, match=r"a sharded checkpoint .* run `hanyeong model consolidate "):
        export_hf(ranks / SHARDED_FROM, tmp_path / "hf", None)
    damaged = tmp_path / "damaged"
    shutil.copytree(ranks / SHARDED_FROM, damaged)
    piece = sorted((damaged / SHARDED_DIR).iterdir())[1]
    piece.write_bytes(piece.read_bytes()[:-8])
    from cuda_model.backend import TorchBackend

    with pytest.raises(CheckpointError, match=rf"{piece.name}: .* bytes, expected"):
        TorchBackend("cpu").load_train_state(damaged)
