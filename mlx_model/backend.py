"""The MLX backend (`get_backend("mlx")`): Metal on Apple silicon, the CPU build elsewhere.

Numpy in, numpy out; the model object is an `mlx_model.model.Model`. Checkpoints are the shared
format of orchestration/core/checkpoint.py, read and written as safetensors with `mx.load` /
`mx.save_safetensors` (never pickle): fp32 weights under Hugging Face Llama names, fp32 AdamW
moments under optimizer_key(name, moment), so the PyTorch backend reads them as they are.

Data parallel across Macs (parallel='ddp'): mlx_model/parallel.py; the ranks are started and
joined by orchestration/cluster/ring_group.py through join_group.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_model import CAPABILITIES
from mlx_model import parallel as dp
from mlx_model import step as steps
from mlx_model.losses import check_reads, get_loss, token_logprobs
from mlx_model.model import Model
from orchestration.core import generation
from orchestration.core.backends import check_lengths
from orchestration.core.batch import Batch
from orchestration.core.checkpoint import (MODEL_FILE, OPTIMIZER_FILE, SPEC_FILE, check_tensors, is_sharded, weights_file,
                                      read_trainer_state, verify, write_trainer_state, writing)  # fmt: skip
from hanyeong.errors import CheckpointError, ConfigError
from orchestration.core.optim import OptimConfig
from orchestration.core.spec import ModelSpec

# "pt" as the torch backend writes, so transformers loads an exported model.safetensors as it is
METADATA = {"format": "pt"}


def read_tensors(file: Path) -> dict[str, mx.array]:
    """All tensors of a safetensors file (read lazily); a damaged file is a CheckpointError."""
    try:
        return mx.load(str(file), format="safetensors")
    except (RuntimeError, ValueError, OSError) as err:
        raise CheckpointError(f"{file}: cannot read the tensors ({err})") from None


def sample(logits: mx.array, temperature: float, top_p: float, key: mx.array,
           suppress: mx.array | None = None, top_k: int = 0, uniforms: mx.array | None = None) -> mx.array:  # fmt: skip
    """logits (B, V) fp32 -> next ids (B,): argmax at temperature 0, else sampling from the top_k
    most likely ids (0: all) that hold top_p of the probability; ids where `suppress` (V,) bool is
    True are never chosen (-inf before either). With `uniforms` (B,) in [0, 1) each row takes the id
    where its uniform falls in the kept ids' CDF (core/generation.RowUniforms); else MLX draws from
    `key`."""
    if suppress is not None:
        logits = mx.where(suppress, mx.array(float("-inf"), logits.dtype), logits)
    if temperature <= 0:
        return logits.argmax(axis=-1)
    logits = logits / temperature
    if top_p >= 1.0 and not top_k and uniforms is None:
        return mx.random.categorical(logits, key=key)
    probs = mx.softmax(logits, axis=-1)
    if top_p >= 1.0 and not top_k:
        kept = probs  # nothing to cut: no sort
    else:
        order = mx.argsort(-probs, axis=-1)
        sorted_p = mx.take_along_axis(probs, order, axis=-1)
        # the smallest prefix reaching top_p (never empty)
        keep = mx.cumsum(sorted_p, axis=-1) - sorted_p < top_p
        if top_k:
            keep = keep & (mx.arange(probs.shape[-1]) < top_k)
        if uniforms is None:
            choice = mx.random.categorical(mx.log(sorted_p * keep), key=key)  # log 0 = -inf: never drawn
            return mx.take_along_axis(order, choice[:, None], axis=-1)[:, 0]
        kept = probs * mx.put_along_axis(mx.zeros(keep.shape, keep.dtype), order, keep, axis=-1)
    # The CDF runs over ids in their own order (see cuda_model/backend.py: robust to near-ties).
    cdf = mx.cumsum(kept, axis=-1)
    target = uniforms.astype(cdf.dtype)[:, None] * cdf[:, -1:]
    return mx.minimum((cdf <= target).sum(axis=-1), probs.shape[-1] - 1)


class MLXBackend:
    name = "mlx"
    capabilities = CAPABILITIES

    def __init__(self, device: str | None = None):
        """On MLX's default device (Metal on a Mac, the CPU build elsewhere): the only one."""
        if device is not None:
            raise ConfigError(f"the MLX backend runs on MLX's default device; device must be None, got {device!r}")

    # ---- models and checkpoints -----------------------------------------------------------------

    def init(self, spec: ModelSpec, seed: int = 0) -> Model:
        """A model with seeded weights (the same seed gives the same weights; not torch's draws)."""
        model = Model(spec)
        model.init_weights(seed)
        return model

    def load(self, path: str | Path) -> Model:
        """The model of a checkpoint: verified whole, names and shapes checked against spec.json."""
        path = Path(path)
        verify(path)
        spec = ModelSpec.load(path / SPEC_FILE)
        file = weights_file(path)
        tensors = read_tensors(file)
        check_tensors(spec, {k: tuple(v.shape) for k, v in tensors.items()}, str(file))
        if spec.tie_embeddings:
            tensors.pop("lm_head.weight", None)  # tied: the head is the embedding
        model = Model(spec)
        model.load_weights([(k, v.astype(mx.float32)) for k, v in tensors.items()], strict=True)
        mx.eval(model.parameters())
        return model

    def save(self, model: Model, path: str | Path, state: steps.TrainState | None = None) -> None:
        """Write a checkpoint atomically: fp32 weights, plus AdamW moments and counters when given.
        With a data-parallel state every rank calls it: rank 0 writes (the ranks' weights are the
        same), and all return once the checkpoint is in place."""
        group = None if state is None else state.group
        if group is None or group.rank() == 0:
            self._write(model, path, state)
        if group is not None:
            dp.barrier(group)

    def _write(self, model: Model, path: str | Path, state: steps.TrainState | None) -> None:
        weights = {k: v.astype(mx.float32) for k, v in tree_flatten(model.parameters())}
        with writing(path, model.spec) as tmp:
            mx.save_safetensors(str(tmp / MODEL_FILE), weights, metadata=METADATA)
            if state is not None:
                mx.save_safetensors(
                    str(tmp / OPTIMIZER_FILE), steps.optimizer_tensors(state), metadata=METADATA
                )
                write_trainer_state(tmp, self.trainer_state(state))

    def trainer_state(self, state: steps.TrainState) -> dict:
        """trainer_state.json: the keys of the torch backend's. rng is empty: MLX's global key cannot
        be set back, so randomness in training (none yet) is to be drawn from (seed, step)."""
        carried = {"carried_steps": state.carried_steps} if state.carried_steps else {}
        return {"step": state.step, "tokens_seen": state.tokens_seen, "optim": state.optim.to_dict(),
                "data_cursor": state.data_cursor, "seed": state.seed, "backend": self.name, "rng": {}, **carried}  # fmt: skip

    # ---- inference ------------------------------------------------------------------------------

    def logits(
        self, model: Model, tokens: np.ndarray, segment_ids: np.ndarray | None = None
    ) -> np.ndarray:
        """int [B, T] -> float32 [B, T, vocab]."""
        seg = None if segment_ids is None else mx.array(np.asarray(segment_ids), mx.int32)
        out = model(mx.array(np.asarray(tokens), mx.int32), seg).astype(mx.float32)
        return np.array(out)

    def logprobs(self, model: Model, batch: Batch) -> np.ndarray:
        """float32 [B, T]: log-probability of each target token (loss_mask not applied)."""
        t = steps.arrays(batch)
        return np.array(token_logprobs(model(t["inputs"], t.get("segment_ids")), t["targets"]))

    def logprobs_at(self, model: Model, tokens: np.ndarray, rows: np.ndarray, positions: np.ndarray,
                    ids: np.ndarray) -> np.ndarray:  # fmt: skip
        """float32 [N]: log p(ids[i]) at (rows[i], positions[i]) of tokens [B, T]; the head runs
        only at the distinct (row, position) pairs (see the protocol, orchestration/core/backends.py)."""
        if len(ids) == 0:
            return np.zeros(0, np.float32)
        width = tokens.shape[1]
        pairs, which = np.unique(np.asarray(rows) * width + np.asarray(positions), return_inverse=True)
        h = model.model(mx.array(np.asarray(tokens), mx.int32))
        h = h[mx.array(pairs // width, mx.int32), mx.array(pairs % width, mx.int32)]  # (U, d_model)
        logits = model.head(h).astype(mx.float32)  # (U, vocab)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)  # fp32, as token_logprobs
        return np.array(logp[mx.array(which.reshape(-1), mx.int32), mx.array(np.asarray(ids), mx.int32)])

    def rewards(self, model: Model, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """float32 [B]: a reward model's score of each row of tokens int [B, T] (right padded), read
        at its last token tokens[b, lengths[b] - 1]; columns past the longest row are not run."""
        lengths = check_lengths(tokens, lengths)
        if len(lengths) == 0:
            return np.zeros(0, np.float32)
        x = mx.array(np.asarray(tokens)[:, : int(lengths.max())], mx.int32)
        return np.array(model.rewards(x, mx.array(lengths - 1, mx.int32)))

    def eval_loss(self, model: Model, batch: Batch, loss: str = "causal_lm") -> float:
        """Mean loss per counted target token, no gradient (DataError: the batch lacks an array
        the loss reads)."""
        check_reads(loss, batch.arrays())
        summed, n, *_ = get_loss(loss)(model, steps.arrays(batch))
        return summed.item() / max(n.item(), 1.0)

    def generate(self, model: Model, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 stop_ids: Sequence[int] = (), allow_ids: Sequence[int] = (),
                 suppress_ids: Sequence[int] | None = None, row_seeds: Sequence[int] | None = None,
                 top_k: int = 0) -> list[list[int]]:  # fmt: skip
        """New tokens per prompt (a stop id ends a row and is included), batched with a KV cache.
        Special ids are never sampled but for stop and allowed ids (core/generation.py). With
        `row_seeds` each row samples from its own stream (generation.sample_key); else one from `seed`."""
        if not prompts or max_new_tokens <= 0:
            return [[] for _ in prompts]
        spec = model.spec
        plan = generation.prepare(prompts, max_new_tokens, spec.vocab_size, spec.max_seq_len,
                                  stop_ids, allow_ids, suppress_ids)  # fmt: skip
        cache = model.new_cache(plan.capacity)
        key = mx.random.key(seed)
        streams = generation.row_streams(row_seeds, len(prompts))
        x, seg = mx.array(plan.tokens, mx.int32), mx.array(plan.segments, mx.int32)
        suppress = mx.array(plan.suppress)
        rows = generation.Rows(len(prompts), stop_ids)
        for _ in range(max_new_tokens):
            h = model.model(x, seg, cache)[:, -1]  # (B, d_model): only the last position's logits
            key, sub = mx.random.split(key)
            uniforms = None if streams is None else mx.array(streams.next(), mx.float32)
            next_ids = sample(model.head(h).astype(mx.float32), temperature, top_p, sub, suppress, top_k, uniforms)
            mx.eval(next_ids, cache.k, cache.v)  # keep the lazy graph one step long
            if rows.add(next_ids.tolist()):
                break
            x, seg = next_ids[:, None].astype(mx.int32), None  # continue each row's document
        return rows.tokens

    # ---- training -------------------------------------------------------------------------------

    def world(self) -> tuple[int, int]:
        """(rank, size) of the mx.distributed group this process joined; (0, 1) alone."""
        group = dp.world_group()
        return group.rank(), group.size()

    def bind_device(self, accelerator: bool, cpus: float) -> None:
        """A rank's device: MLX's default (its Mac's Metal GPU); nothing to bind."""
        return None

    def open_rendezvous(self, host: str) -> dict:
        """This rank's ring endpoint: {"endpoint": "ip:port"}, a port free now on `host` (or on
        HANYEONG_MLX_RING_IP where the node sets it: mlx_model/parallel.endpoint)."""
        return {"endpoint": dp.endpoint(host)}

    def join_group(self, rank: int, size: int, rendezvous: dict) -> None:
        """Join the ring of every rank's endpoint (rendezvous["ranks"], in rank order) as `rank`."""
        endpoints = [r["endpoint"] for r in rendezvous["ranks"]]
        if len(endpoints) != size:
            raise ConfigError(f"a ring of {size} ranks needs {size} endpoints, got {len(endpoints)}")
        dp.join_ring(rank, size, endpoints)

    def leave_group(self) -> None:
        """Nothing: MLX cannot leave a ring; the rank's process ends with it."""

    def init_train_state(self, model: Model, optim: OptimConfig, seed: int = 0,
                         compile: bool | None = None, parallel: str | None = None,
                         activation_checkpointing: bool = False) -> steps.TrainState:  # fmt: skip
        """AdamW and counters at step 0; compile defaults to HANYEONG_MLX_COMPILE (on).
        parallel='ddp': one rank of the process's group, with rank 0's weights ('fsdp': ConfigError).
        `activation_checkpointing`: train steps recompute each block's activations (mx.checkpoint)."""
        group = dp.data_parallel_group(parallel)
        mx.random.seed(seed)  # for anything random in training (none yet: no dropout)
        if group is not None:
            dp.check_same_position(0, 0, group)
            dp.broadcast_weights(model, group)
        return steps.init_train_state(model, optim, seed, compile=compile, group=group,
                                      activation_checkpointing=activation_checkpointing)  # fmt: skip

    def load_train_state(self, path: str | Path, compile: bool | None = None,
                         parallel: str | None = None,
                         activation_checkpointing: bool = False) -> steps.TrainState:  # fmt: skip
        """Model, AdamW moments and counters of a training checkpoint (either backend's), to go on.
        parallel='ddp': every rank of the group loads the same checkpoint. The checkpoint does not
        say whether activations were recomputed: `activation_checkpointing`."""
        group = dp.data_parallel_group(parallel)
        path = Path(path)
        model = self.load(path)
        meta = read_trainer_state(path)
        if not (path / OPTIMIZER_FILE).is_file():
            hint = f"; it is sharded: run `hanyeong model consolidate {path}`" if is_sharded(path) else ""
            raise CheckpointError(f"{path}: no {OPTIMIZER_FILE}: cannot resume the optimizer{hint}")
        if group is not None:
            dp.check_same_position(int(meta["step"]), int(meta["tokens_seen"]), group)
        optim = OptimConfig.from_dict(meta["optim"])
        state = steps.init_train_state(model, optim, meta.get("seed", 0), compile=compile, group=group,
                                       activation_checkpointing=activation_checkpointing)  # fmt: skip
        state.step, state.tokens_seen = int(meta["step"]), int(meta["tokens_seen"])
        state.data_cursor, state.carried_steps = meta.get("data_cursor"), int(meta.get("carried_steps", 0))
        file = path / OPTIMIZER_FILE
        steps.load_optimizer_tensors(state, read_tensors(file), str(file))
        mx.random.seed(
            state.seed
        )  # as init_train_state; a torch checkpoint's rng.torch means nothing here
        return state

    def carry_optimizer(self, state: steps.TrainState, path: str | Path) -> None:
        """Continue `path`'s AdamW moments in a fresh `state` of the same parameters (a stage's
        carry_optimizer): the moments and their step count, not the schedule's step or the data."""
        path = Path(path)
        meta = read_trainer_state(path)
        file = path / OPTIMIZER_FILE
        if not file.is_file():
            hint = f"; it is sharded: run `hanyeong model consolidate {path}`" if is_sharded(path) else ""
            raise CheckpointError(f"{path}: no {OPTIMIZER_FILE}: no AdamW moments to carry on{hint}")
        state.carried_steps = int(meta["step"]) + int(meta.get("carried_steps", 0))
        steps.load_optimizer_tensors(state, read_tensors(file), str(file))

    def train_step(
        self, state: steps.TrainState, batch: Batch, loss: str = "causal_lm"
    ) -> dict[str, float]:
        """One optimizer step on a global batch (data-parallel: this rank's rows of it); returns the
        global batch's loss, grad_norm, lr, tokens, counted_tokens."""
        return steps.train_step(state, batch, loss)


# the backend of get_backend("mlx"); never changed
BACKEND = MLXBackend()
