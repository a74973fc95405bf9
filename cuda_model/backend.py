"""The PyTorch backend (`get_backend("torch")`): CUDA when there is a GPU, else the CPU.

Numpy in, numpy out; the model object is a `cuda_model.model.Model`. Checkpoints are the shared
format of orchestration/core/checkpoint.py, read and written with safetensors only (never pickle):
fp32 weights under Hugging Face Llama names, fp32 AdamW moments under optimizer_key(name, moment).
A data-parallel stage (`parallel` 'ddp' / 'fsdp', cuda_model/parallel.py): every rank calls save.
DDP: rank 0 writes the single-file layout. FSDP: each rank writes its pieces (the SHARDED layout,
cuda_model/sharded.py), so no process gathers the model. Either layout loads on any worker count.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from cuda_model import CAPABILITIES
from cuda_model import parallel as par
from cuda_model import sharded
from cuda_model import step as steps
from cuda_model.losses import Tensors, check_reads, get_loss, token_logprobs
from cuda_model.model import Model
from orchestration.core import generation
from orchestration.core.backends import check_lengths
from orchestration.core.batch import Batch
from orchestration.core.checkpoint import (
    MODEL_FILE,
    OPTIMIZER_FILE,
    SPEC_FILE,
    check_tensors,
    has_weights_file,
    is_sharded,
    read_trainer_state,  # fmt: skip
    verify,
    write_trainer_state,
    writing,
)
from hanyeong.errors import CheckpointError, ConfigError
from orchestration.core.optim import OptimConfig
from orchestration.core.spec import ModelSpec

ENV_DEVICE = "HANYEONG_TORCH_DEVICE"  # e.g. "cpu" to keep off a GPU; default: cuda if available


def read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file on the CPU; a damaged file is a CheckpointError naming it."""
    try:
        return load_file(file, device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{file}: cannot read the tensors ({err})") from None


def tensor_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes from the header only, to refuse a wrong file before reading gigabytes."""
    try:
        with safe_open(file, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{file}: cannot read the tensors ({err})") from None


def encode_rng(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode("ascii")


def decode_rng(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator,
           suppress: torch.Tensor | None = None, top_k: int = 0,
           uniforms: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """logits (B, V) fp32 -> next ids (B,): argmax at temperature 0, else sampling from the top_k
    most likely ids (0: all) that hold top_p of the probability; ids where `suppress` (V,) bool is
    True are never chosen (-inf before either). With `uniforms` (B,) in [0, 1) each row takes the id
    where its uniform falls in the kept ids' CDF (core/generation.RowUniforms: a row's draw depends
    on its own stream only); else torch draws from `generator`."""
    if suppress is not None:
        logits = logits.masked_fill(suppress, float("-inf"))
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p >= 1.0 and not top_k:
        if uniforms is None:
            return torch.multinomial(probs, 1, generator=generator)[:, 0]
        kept = probs  # nothing to cut: no sort
    else:
        sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
        keep = sorted_p.cumsum(dim=-1) - sorted_p < top_p  # smallest prefix reaching top_p (never empty)
        if top_k:
            keep[:, top_k:] = False
        if uniforms is None:
            choice = torch.multinomial(sorted_p * keep, 1, generator=generator)  # multinomial renormalises
            return order.gather(-1, choice)[:, 0]
        kept = probs * torch.zeros_like(keep).scatter_(-1, order, keep)
    # The CDF runs over ids in their own order, not by probability: two near-equal probabilities
    # swapping places (last-bit differences between batch shapes) then moves no other id's interval.
    cdf = kept.cumsum(dim=-1)
    target = uniforms.to(cdf.dtype)[:, None] * cdf[:, -1:]
    return (cdf <= target).sum(dim=-1).clamp_(max=probs.shape[-1] - 1)


class TorchBackend:
    name = "torch"
    capabilities = CAPABILITIES

    def __init__(self, device: str | torch.device | None = None):
        """On `device` ('cpu', 'cuda', 'cuda:1'); by default HANYEONG_TORCH_DEVICE, else CUDA when
        there is a GPU. get_backend(name, device) builds one per device; none changes afterwards."""
        default = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device or os.environ.get(ENV_DEVICE) or default)

    # ---- models and checkpoints -----------------------------------------------------------------

    def new_model(self, spec: ModelSpec) -> Model:
        with self.device:  # allocate (and run nn.Linear's throwaway init) on the target device
            model = Model(spec)
        return model.to(self.device)  # RoPE tables are built on the CPU; move them too

    def init(self, spec: ModelSpec, seed: int = 0) -> Model:
        """A model with seeded weights: the same seed gives the same weights on any device."""
        model = self.new_model(spec)
        model.init_weights(seed)
        return model

    def load(self, path: str | Path) -> Model:
        """The model of a checkpoint: verified whole, names and shapes checked against spec.json
        (a sharded one without model.safetensors: its pieces, read whole)."""
        path = Path(path)
        verify(path)
        spec = ModelSpec.load(path / SPEC_FILE)
        if not has_weights_file(path):
            model = self.new_model(spec)
            sharded.load_weights(model, path)
            return model
        file = path / MODEL_FILE
        check_tensors(spec, tensor_shapes(file), str(file))
        tensors = read_tensors(file)
        if spec.tie_embeddings:
            tensors.pop("lm_head.weight", None)  # tied: the head is the embedding
        model = self.new_model(spec)
        model.load_state_dict(tensors, strict=True)
        return model

    def save(self, model: Model, path: str | Path, state: steps.TrainState | None = None) -> None:
        """Write a checkpoint atomically: fp32 weights, plus AdamW moments and counters when given.

        On a parallel state every rank calls it, and all return once the checkpoint is in place:
        FSDP ranks write their pieces (the SHARDED layout), DDP's rank 0 the single-file layout."""
        if state is not None and state.parallel == "fsdp":
            return sharded.save(state, path, self.trainer_state(state))
        group = state is not None and state.parallel is not None
        writes = not group or state.rank == 0
        weights = {}
        for name, value in model.state_dict().items():
            value = par.full_tensor(value.detach())
            if writes:
                weights[name] = value.float().cpu().contiguous()
        moments = steps.optimizer_tensors(state, keep=writes) if state is not None else None
        if writes:
            with writing(path, model.spec) as tmp:
                # "pt": transformers loads it
                save_file(weights, tmp / MODEL_FILE, metadata={"format": "pt"})
                if state is not None:
                    save_file(moments, tmp / OPTIMIZER_FILE, metadata={"format": "pt"})
                    write_trainer_state(tmp, self.trainer_state(state))
        if group:
            par.barrier()

    def carry_optimizer(self, state: steps.TrainState, path: str | Path) -> None:
        """Continue `path`'s AdamW moments in a fresh `state` of the same parameters (a stage's
        carry_optimizer): the moments and their step count, not the schedule's step or the data."""
        path = Path(path)
        meta = read_trainer_state(path)
        state.carried_steps = int(meta["step"]) + int(meta.get("carried_steps", 0))
        if is_sharded(path):
            sharded.load_state(state, path)  # the weights read too: the same as the state's
        else:
            if not (path / OPTIMIZER_FILE).is_file():
                raise CheckpointError(f"{path}: no {OPTIMIZER_FILE}: no AdamW moments to carry on")
            file = path / OPTIMIZER_FILE
            steps.load_optimizer_tensors(state, read_tensors(file), str(file))

    def consolidate(self, path: str | Path, out: str | Path | None = None, weights_only: bool = False) -> Path:
        """A sharded checkpoint in the single-file layout (cuda_model/sharded.py `consolidate`)."""
        return sharded.consolidate(path, out, weights_only)

    def trainer_state(self, state: steps.TrainState) -> dict:
        rng = {"torch": encode_rng(torch.get_rng_state())}
        if self.device.type == "cuda":
            rng["torch_cuda"] = encode_rng(torch.cuda.get_rng_state(self.device))
        carried = {"carried_steps": state.carried_steps} if state.carried_steps else {}
        return {"step": state.step, "tokens_seen": state.tokens_seen, "optim": state.optim.to_dict(),
                "data_cursor": state.data_cursor, "seed": state.seed, "backend": self.name, "rng": rng, **carried}  # fmt: skip

    # ---- inference ------------------------------------------------------------------------------

    def put(self, array: np.ndarray | None, dtype: type | None = None) -> torch.Tensor | None:
        """A numpy array on the device; without `dtype`: ints int64, floats float32, bools bool."""
        if array is None:
            return None
        array = np.asarray(array)
        if dtype is None:
            kind = array.dtype.kind
            dtype = np.int64 if kind in "iu" else np.float32 if kind == "f" else array.dtype
        return torch.from_numpy(np.ascontiguousarray(array, dtype)).to(self.device)

    def tensors(self, batch: Batch) -> Tensors:
        """Every array of a Batch as a tensor on the device, by name (ids int64, floats float32)."""
        return {name: self.put(array) for name, array in batch.arrays().items()}

    @torch.no_grad()
    def logits(
        self, model: Model, tokens: np.ndarray, segment_ids: np.ndarray | None = None
    ) -> np.ndarray:
        """int [B, T] -> float32 [B, T, vocab]."""
        model.eval()
        with steps.precision(self.device):
            out = model(self.put(tokens, np.int64), self.put(segment_ids, np.int64))
        return out.float().cpu().numpy()

    @torch.no_grad()
    def logprobs(self, model: Model, batch: Batch) -> np.ndarray:
        """float32 [B, T]: log-probability of each target token (loss_mask not applied)."""
        model.eval()
        t = self.tensors(batch)
        with steps.precision(self.device):
            out = token_logprobs(model(t["inputs"], t.get("segment_ids")), t["targets"])
        return out.float().cpu().numpy()

    @torch.no_grad()
    def logprobs_at(self, model: Model, tokens: np.ndarray, rows: np.ndarray, positions: np.ndarray,
                    ids: np.ndarray) -> np.ndarray:  # fmt: skip
        """float32 [N]: log p(ids[i]) at (rows[i], positions[i]) of tokens [B, T]; the head runs
        only at the distinct (row, position) pairs (see the protocol, orchestration/core/backends.py)."""
        if len(ids) == 0:
            return np.zeros(0, np.float32)
        model.eval()
        width = tokens.shape[1]
        pairs, which = np.unique(np.asarray(rows) * width + np.asarray(positions), return_inverse=True)
        r, p = self.put(pairs // width), self.put(pairs % width)
        with steps.precision(self.device):
            h = model.model(self.put(tokens, np.int64))[r, p]  # (U, d_model)
            logits = F.linear(h, model.head_weight())  # (U, vocab), bf16 under autocast as in logits
        logp = torch.log_softmax(logits.float(), dim=-1)  # fp32, as token_logprobs
        return logp[self.put(which.reshape(-1)), self.put(ids)].cpu().numpy()

    @torch.no_grad()
    def rewards(self, model: Model, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """float32 [B]: a reward model's score of each row of tokens int [B, T] (right padded), read
        at its last token tokens[b, lengths[b] - 1]; columns past the longest row are not run."""
        lengths = check_lengths(tokens, lengths)
        if len(lengths) == 0:
            return np.zeros(0, np.float32)
        model.eval()
        width = int(lengths.max())
        with steps.precision(self.device):
            r = model.rewards(self.put(np.asarray(tokens)[:, :width], np.int64), self.put(lengths - 1))
        return r.float().cpu().numpy()

    @torch.no_grad()
    def eval_loss(self, model: Model, batch: Batch, loss: str = "causal_lm") -> float:
        """Mean loss per counted target token, no gradient (DataError: the batch lacks an array
        the loss reads)."""
        check_reads(loss, batch.arrays())
        model.eval()
        with steps.precision(self.device):
            summed, n, *_ = get_loss(loss)(model, self.tensors(batch))
        return summed.item() / max(n.item(), 1.0)

    @torch.no_grad()
    def generate(self, model: Model, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 stop_ids: Sequence[int] = (), allow_ids: Sequence[int] = (),
                 suppress_ids: Sequence[int] | None = None, row_seeds: Sequence[int] | None = None,
                 top_k: int = 0) -> list[list[int]]:  # fmt: skip
        """New tokens per prompt (a stop id ends a row and is included), batched with a KV cache.
        Special ids are never sampled but for stop and allowed ids (core/generation.py). With
        `row_seeds` (one key per row, generation.sample_key) each row samples from its own stream,
        so its tokens do not depend on the other rows of the batch; else one stream from `seed`."""
        if not prompts or max_new_tokens <= 0:
            return [[] for _ in prompts]
        spec = model.spec
        plan = generation.prepare(prompts, max_new_tokens, spec.vocab_size, spec.max_seq_len,
                                  stop_ids, allow_ids, suppress_ids)  # fmt: skip
        model.eval()
        cache = model.new_cache(plan.capacity)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        streams = generation.row_streams(row_seeds, len(prompts))
        x, seg, suppress = self.put(plan.tokens), self.put(plan.segments), self.put(plan.suppress)
        rows = generation.Rows(len(prompts), stop_ids)
        for _ in range(max_new_tokens):
            with steps.precision(self.device):
                h = model.model(x, seg, cache)[:, -1]  # (B, d_model): the last position's only
                logits = F.linear(h, model.head_weight()).float()
            uniforms = None if streams is None else torch.from_numpy(streams.next()).to(self.device)
            next_ids = sample(logits, temperature, top_p, generator, suppress, top_k, uniforms)
            if rows.add(next_ids.tolist()):
                break
            x, seg = next_ids[:, None], None  # continue each row's document
        return rows.tokens

    # ---- training -------------------------------------------------------------------------------

    def world(self) -> tuple[int, int]:
        """(rank, size) of the torch.distributed group this process is in; (0, 1) alone."""
        return par.world()

    def bind_device(self, accelerator: bool, cpus: float) -> str:
        """A Ray Train worker's device: the current CUDA device when it holds a GPU (TorchTrainer
        made it current), else the CPU (a CPU stage stays off a GPU the node may have); torch's
        CPU threads = the worker's CPUs."""
        torch.set_num_threads(max(1, int(cpus)))
        if not accelerator:
            return "cpu"
        if not torch.cuda.is_available():
            raise ConfigError("this worker holds a GPU but torch sees no CUDA device (a CPU build of torch?)")
        return f"cuda:{torch.cuda.current_device()}"

    def open_rendezvous(self, host: str) -> dict:
        """Rank 0: a socket for the process group's store, on `host` only: {"host", "port",
        "listen_fd"} (the descriptor is this process's; the other ranks connect to host:port)."""
        fd, port = par.listen(host)
        return {"host": host, "port": port, "listen_fd": fd}

    def join_group(self, rank: int, size: int, rendezvous: dict) -> None:
        """Join the default process group through rank 0's store: gloo on the CPU, NCCL on CUDA."""
        fd = rendezvous.get("listen_fd") if rank == 0 else None
        par.init_group(rank, size, rendezvous["host"], rendezvous["port"], listen_fd=fd, device=self.device)

    def leave_group(self) -> None:
        par.leave_group()

    def init_train_state(self, model: Model, optim: OptimConfig, seed: int = 0, compile: bool | None = None,
                         fused: bool | None = None, parallel: str | None = None,
                         activation_checkpointing: bool = False,
                         mixed_precision: bool | None = None) -> steps.TrainState:  # fmt: skip
        """AdamW and counters at step 0; compile/fused/mixed_precision default to
        HANYEONG_TORCH_COMPILE/_FUSED_ADAMW/_FSDP_BF16 (fused and FSDP bf16: on CUDA).
        `parallel` ('ddp' / 'fsdp'): this process is one rank of the default process group.
        `activation_checkpointing`: train steps recompute each block's activations in backward."""
        torch.manual_seed(seed)  # for anything random in training (none yet: no dropout)
        return steps.init_train_state(model, optim, seed, compile=compile, fused=fused, parallel=parallel,
                                      activation_checkpointing=activation_checkpointing,
                                      mixed_precision=mixed_precision)  # fmt: skip

    def load_train_state(self, path: str | Path, compile: bool | None = None, fused: bool | None = None,
                         parallel: str | None = None,
                         activation_checkpointing: bool = False) -> steps.TrainState:  # fmt: skip
        """Model, AdamW moments, counters and RNG of a training checkpoint, ready to continue
        on any worker count: from the single-file layout every rank reads the whole checkpoint and
        keeps its share; from the sharded one each FSDP rank reads its pieces. The checkpoint does
        not say whether activations were recomputed: `activation_checkpointing`."""
        path = Path(path)
        pieces = is_sharded(path)
        if pieces:  # allocated, not initialised: the pieces are read into it once it is laid out
            verify(path)
            model = self.new_model(ModelSpec.load(path / SPEC_FILE))
        else:
            model = self.load(path)
        meta = read_trainer_state(path)
        if not pieces and not (path / OPTIMIZER_FILE).is_file():
            raise CheckpointError(f"{path}: no {OPTIMIZER_FILE}: cannot resume the optimizer")
        state = steps.init_train_state(model, OptimConfig.from_dict(meta["optim"]), meta.get("seed", 0),
                                       compile=compile, fused=fused, parallel=parallel,
                                       activation_checkpointing=activation_checkpointing)  # fmt: skip
        state.step, state.tokens_seen = int(meta["step"]), int(meta["tokens_seen"])
        state.data_cursor, state.carried_steps = meta.get("data_cursor"), int(meta.get("carried_steps", 0))
        if pieces:
            sharded.load_state(state, path)
        else:
            steps.load_optimizer_tensors(
                state, read_tensors(path / OPTIMIZER_FILE), str(path / OPTIMIZER_FILE)
            )
        rng = meta.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(decode_rng(rng["torch"]))
        if "torch_cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(decode_rng(rng["torch_cuda"]), self.device)
        return state

    def train_step(
        self, state: steps.TrainState, batch: Batch, loss: str = "causal_lm"
    ) -> dict[str, float]:
        """One optimizer step on a global batch (on a parallel state: this rank's rows of it);
        returns the global batch's loss, grad_norm, lr, tokens, counted_tokens. Every array of the
        batch reaches the loss; one it reads being absent is a DataError before any compute."""
        return steps.train_step(state, self.tensors(batch), loss)


# the default device's backend (get_backend("torch")); never changed: another device is another object
BACKEND = TorchBackend()
