"""Sharded checkpoints (orchestration/core/checkpoint.py's SHARDED layout) for FSDP stages.

Each rank writes the pieces of the weights and AdamW moments it holds into one safetensors file of
its own, streamed tensor by tensor from the live storage (no gather, no serialised copy), so a
save adds at most one tensor's piece to a rank's host memory; the single-file save gathers every
tensor whole onto rank 0 (about 94 GB at 7.8B parameters with the moments). The files carry
torch.distributed.checkpoint's (DCP's) offsets in their header, exactly as its safetensors writer
does, so DCP reads them back resharded: a group of any size, or one process, gets its own pieces of
every tensor. No pickle anywhere (DCP's default writer would add a pickled .metadata); DCP's own
safetensors writer serialises each rank's file whole in memory first (twice the shard), hence ours.

`consolidate` writes the single-file layout from the pieces, one piece at a time: FSDP shards each
tensor along dim 0, so a piece is a contiguous byte range of the tensor in model.safetensors and is
written in place; host memory stays at one piece.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open

from cuda_model import parallel as par
from cuda_model import step as steps
from hanyeong.errors import CheckpointError
from orchestration.core.checkpoint import (
    ADAM_MOMENTS,
    MODEL_FILE,
    OPTIMIZER_FILE,
    SHARDED_DIR,
    SPEC_FILE,
    TRAINER_STATE_FILE,
    check_tensors,
    optimizer_key,
    verify,
    write_trainer_state,
    writing,
)
from orchestration.core.spec import ModelSpec

DCP_INFO = "DCP_SHARDING_INFO"  # the header metadata key of DCP's safetensors writer: {name: {"saved_offsets"}}
MOMENT_SUFFIXES = tuple(f".{m}" for m in ADAM_MOMENTS)
DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}


def state_tensors(state: steps.TrainState) -> dict[str, torch.Tensor]:
    """The weights (model.state_dict() names, as the single-file layout) and AdamW moments
    (optimizer_key names) as this process holds them: DTensor pieces under FSDP. They share storage
    with the model and AdamW, so loading into them loads the state in place; a moment AdamW has not
    created yet (before step 1) is a zero tensor laid out as its parameter."""
    tensors = {name: value.detach() for name, value in state.model.state_dict().items()}
    for name, p in state.model.named_parameters():
        moments = state.optimizer.state.get(p, {})
        for moment in ADAM_MOMENTS:
            value = moments.get(moment)
            tensors[optimizer_key(name, moment)] = torch.zeros_like(p.detach()) if value is None else value.detach()
    return tensors


def save(state: steps.TrainState, path: str | Path, trainer_state: dict) -> None:
    """Every rank of the group calls it: rank 0 opens the checkpoint's temporary folder and tells
    the others where it is, each rank writes its pieces there, rank 0 publishes the whole (index,
    rename) once all are written, and every rank returns once the checkpoint is in place."""
    tensors = state_tensors(state)
    piece_file = f"shard-{state.rank + 1:05d}-model-00001-of-00001.safetensors"  # DCP's name for a rank's file
    if state.rank == 0:
        with writing(path, state.model.spec) as tmp:
            (tmp / SHARDED_DIR).mkdir()
            dist.broadcast_object_list([str(tmp)], src=0)
            write_pieces(tensors, tmp / SHARDED_DIR / piece_file)
            write_trainer_state(tmp, trainer_state)
            par.barrier()  # every rank's pieces are written
    else:
        where = [None]
        dist.broadcast_object_list(where, src=0)
        write_pieces(tensors, Path(where[0]) / SHARDED_DIR / piece_file)
        par.barrier()
    par.barrier()  # published


def write_pieces(tensors: dict[str, torch.Tensor], file: Path) -> None:
    """This process's pieces of `tensors` as one safetensors file with DCP's offsets in its header,
    each piece streamed from its storage (a GPU piece is copied to the host one at a time)."""
    pieces = []
    for name, value in sorted(tensors.items()):
        offsets = [0] * value.dim()
        if par.is_sharded(value):
            chunks = value.__create_chunk_list__()  # this rank's part of the whole tensor (DCP's own call)
            offsets = list(chunks[0].offsets) if chunks else offsets
            value = value.to_local()
        if value.numel():  # a rank may hold no rows of a small tensor
            pieces.append((name, value, offsets))
    metadata = {DCP_INFO: json.dumps({n: {"saved_offsets": o} for n, _, o in pieces}), "DCP_VERSION": "1.0"}
    entries = [(name, DTYPE_NAMES[value.dtype], tuple(value.shape)) for name, value, _ in pieces]
    with open(file, "wb") as f:
        _write_header(f, entries, metadata)
        for _, value, _ in pieces:
            f.write(memoryview(value.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()))


def shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's full shape, from the pieces' headers."""
    return {name: shape for name, (shape, _, _) in _pieces(Path(path) / SHARDED_DIR).items()}


def load(tensors: dict[str, torch.Tensor], path: str | Path, spec: ModelSpec, distributed: bool) -> None:
    """Read a sharded checkpoint into `tensors` in place (plain tensors: whole; DTensors: this rank's
    pieces, a collective of the group when `distributed`). Names and shapes are checked first."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint import load as dcp_load

    path = Path(path)
    found = shapes(path)
    check_tensors(spec, {k: v for k, v in found.items() if not k.endswith(MOMENT_SUFFIXES)}, str(path / SHARDED_DIR))
    if missing := sorted(set(tensors) - set(found)):
        raise CheckpointError(f"{path / SHARDED_DIR}: no {', '.join(missing[:3])} in the pieces")
    try:
        with warnings.catch_warnings():  # DCP warns that a read without a process group is local: it is meant
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp_load(tensors, storage_reader=HuggingFaceStorageReader(str(path / SHARDED_DIR)), no_dist=not distributed)
    except Exception as err:  # DCP wraps every rank's failure in a CheckpointException
        raise CheckpointError(f"{path / SHARDED_DIR}: cannot read the pieces ({str(err).splitlines()[0]})") from None


def load_weights(model, path: str | Path) -> None:
    """The weights of a sharded checkpoint into a plain (unsharded) model, read whole."""
    tensors = {name: value.detach() for name, value in model.state_dict().items()}
    load(tensors, path, model.spec, distributed=False)


def load_state(state: steps.TrainState, path: str | Path) -> None:
    """Weights and moments of a sharded checkpoint into `state` (its counters already set), resharded
    to its layout: an FSDP group of any size reads its pieces, one process reads them whole."""
    tensors = state_tensors(state)
    load(tensors, path, state.model.spec, distributed=state.parallel == "fsdp")
    if state.step + state.carried_steps > 0:  # before any step AdamW creates zero moments itself
        moments = {name: {m: tensors[optimizer_key(name, m)] for m in ADAM_MOMENTS}
                   for name, _ in state.model.named_parameters()}  # fmt: skip
        steps.install_moments(state, moments)


# ---- consolidation ------------------------------------------------------------------------------


def _pieces(folder: Path) -> dict[str, tuple[tuple[int, ...], str, list[tuple[Path, tuple[int, ...], tuple[int, ...]]]]]:
    """{name: (full shape, dtype, [(file, offsets, piece shape)])} from the safetensors headers."""
    found: dict = {}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no safetensors pieces there")
    for file in files:
        try:
            with open(file, "rb") as f:
                header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
            offsets = json.loads(header.pop("__metadata__", {}).get(DCP_INFO, "{}"))
        except (OSError, ValueError, struct.error) as err:
            raise CheckpointError(f"{file}: cannot read the header ({err})") from None
        for name, entry in header.items():
            start = tuple(offsets.get(name, {}).get("saved_offsets", [0] * len(entry["shape"])))
            shape, dtype, pieces = found.setdefault(name, ((), entry["dtype"], []))
            end = tuple(s + o for s, o in zip(entry["shape"], start))
            full = tuple(max(a, b) for a, b in zip(shape, end)) if shape else end
            found[name] = (full, dtype, pieces + [(file, start, tuple(entry["shape"]))])
    return found


def _write_header(f, entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict) -> dict:
    """A safetensors header for `entries` (name, dtype, shape), the tensors to follow in that order;
    returns it. The file is sized to hold them."""
    header, offset = {"__metadata__": {**metadata, "format": "pt"}}, 0  # "pt": transformers loads it
    for name, dtype, shape in entries:
        size = int(np.prod(shape, dtype=np.int64)) * DTYPE_BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data to 8 bytes
    f.write(struct.pack("<Q", len(text)) + text)
    f.truncate(f.tell() + offset)
    return header


def _write_file(out: Path, names: list[str], pieces: dict) -> None:
    """A safetensors file of the whole tensors `names`, each written piece by piece at its place."""
    with open(out, "wb") as f:
        header = _write_header(f, [(name, pieces[name][1], pieces[name][0]) for name in names], {})
        base = f.tell()
        for name in names:
            shape, dtype, parts = pieces[name]
            row = int(np.prod(shape[1:], dtype=np.int64)) * DTYPE_BYTES[dtype]
            covered = 0
            for file, start, piece in parts:
                if any(start[1:]) or tuple(piece[1:]) != tuple(shape[1:]):
                    raise CheckpointError(f"{file}: {name} is cut along a dimension other than the first")
                with safe_open(file, framework="pt") as source:
                    data = source.get_tensor(name).contiguous().view(torch.uint8).numpy()
                f.seek(base + header[name]["data_offsets"][0] + (start[0] if start else 0) * row)
                f.write(data.tobytes())
                covered += data.nbytes
            if covered != header[name]["data_offsets"][1] - header[name]["data_offsets"][0]:
                raise CheckpointError(f"{out.name}: the pieces of {name} do not cover it exactly")


def consolidate(path: str | Path, out: str | Path | None = None, weights_only: bool = False) -> Path:
    """The single-file layout of the sharded checkpoint `path`, written atomically at `out` (default:
    in place). In full: model.safetensors, optimizer.safetensors and trainer_state.json, resumable
    by one worker. `weights_only`: the checkpoint stays sharded and gains model.safetensors (what a
    stage's final checkpoint gets, for export-hf, evaluation and the next stage)."""
    path = Path(path)
    out = path if out is None else Path(out)
    index = verify(path)
    if not (path / SHARDED_DIR).is_dir():
        raise CheckpointError(f"{path}: not a sharded checkpoint (no {SHARDED_DIR}/); it is single-file already")
    spec = ModelSpec.load(path / SPEC_FILE)
    try:
        pieces = _pieces(path / SHARDED_DIR)
        moments = sorted(k for k in pieces if k.endswith(MOMENT_SUFFIXES))
        weights = sorted(k for k in pieces if not k.endswith(MOMENT_SUFFIXES))
        check_tensors(spec, {k: pieces[k][0] for k in weights}, str(path / SHARDED_DIR))
        with writing(out, spec) as tmp:
            _write_file(tmp / MODEL_FILE, weights, pieces)
            keep = [n for n in index["files"] if n not in (SPEC_FILE, MODEL_FILE)]
            if not weights_only:
                _write_file(tmp / OPTIMIZER_FILE, moments, pieces)
                keep = [n for n in keep if n == TRAINER_STATE_FILE]
            for name in keep:  # the trainer state (and when weights_only, the pieces): linked, not copied
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(path / name, tmp / name)
                except OSError:
                    shutil.copyfile(path / name, tmp / name)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: cannot consolidate ({err})") from None
    return out
