"""The MLX backend (`get_backend("mlx")`): Metal on Apple silicon, the CPU build elsewhere.

Numpy in, numpy out; the model object is an `mlx_model.model.Model`. Checkpoints are the shared
format of orchestration/core/checkpoint.py, read and written as safetensors with `mx.load` /
`mx.save_safetensors` (never pickle): fp32 weights under Hugging Face Llama names, fp32 AdamW
moments under optimizer_key(name, moment), so the PyTorch backend reads them as they are.

Data parallel across Macs (parallel='ddp'): mlx_model/parallel.py; the ranks are started and
joined by orchestration/cluster/workers_mlx.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_model import parallel as dp
from mlx_model import step as steps
from mlx_model.losses import get_loss, token_logprobs
from mlx_model.model import Model
from orchestration.core.batch import Batch
from orchestration.core.checkpoint import (MODEL_FILE, OPTIMIZER_FILE, SPEC_FILE, check_tensors,
                                      read_trainer_state, verify, write_trainer_state, writing)  # fmt: skip
from hanyeong.errors import CheckpointError, ConfigError, DataError
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


def sample(logits: mx.array, temperature: float, top_p: float, key: mx.array) -> mx.array:
    """logits (B, V) fp32 -> next ids (B,): argmax at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(axis=-1)
    logits = logits / temperature
    if top_p >= 1.0:
        return mx.random.categorical(logits, key=key)
    probs = mx.softmax(logits, axis=-1)
    order = mx.argsort(-probs, axis=-1)
    sorted_p = mx.take_along_axis(probs, order, axis=-1)
    # the smallest prefix reaching top_p (never empty)
    keep = mx.cumsum(sorted_p, axis=-1) - sorted_p < top_p
    choice = mx.random.categorical(mx.log(sorted_p * keep), key=key)  # log 0 = -inf: never drawn
    return mx.take_along_axis(order, choice[:, None], axis=-1)[:, 0]


class MLXBackend:
    name = "mlx"

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
        file = path / MODEL_FILE
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
        return {"step": state.step, "tokens_seen": state.tokens_seen, "optim": state.optim.to_dict(),
                "data_cursor": state.data_cursor, "seed": state.seed, "backend": self.name, "rng": {}}  # fmt: skip

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

    def eval_loss(self, model: Model, batch: Batch, loss: str = "causal_lm") -> float:
        """Mean loss per counted target token, no gradient."""
        summed, n = get_loss(loss)(model, steps.arrays(batch))
        return summed.item() / max(n.item(), 1.0)

    def generate(self, model: Model, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 stop_ids: Sequence[int] = ()) -> list[list[int]]:  # fmt: skip
        """New tokens per prompt (a stop id ends a row and is included), batched with a KV cache."""
        if not prompts or max_new_tokens <= 0:
            return [[] for _ in prompts]
        if any(len(p) == 0 for p in prompts):
            raise DataError("generate: every prompt needs at least one token")
        B, L = len(prompts), max(len(p) for p in prompts)
        if L + max_new_tokens > model.spec.max_seq_len:
            raise ConfigError(f"generate: {L} prompt + {max_new_tokens} new tokens exceed spec.max_seq_len "
                              f"({model.spec.max_seq_len})")  # fmt: skip
        # Left-pad: padding is document 0 and the prompt document 1, so no prompt sees padding and
        # each starts at RoPE position 0, exactly as if it were generated alone.
        tokens, segments = np.zeros((B, L), np.int32), np.zeros((B, L), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, L - len(p) :], segments[i, L - len(p) :] = p, 1
        cache = model.new_cache(B, L + max_new_tokens)
        key = mx.random.key(seed)
        x, seg = mx.array(tokens), mx.array(segments)
        stop, out, done = set(stop_ids), [[] for _ in range(B)], [False] * B
        for _ in range(max_new_tokens):
            h = model.model(x, seg, cache)[:, -1]  # (B, d_model): only the last position's logits
            key, sub = mx.random.split(key)
            next_ids = sample(model.head(h).astype(mx.float32), temperature, top_p, sub)
            mx.eval(next_ids, cache.k, cache.v)  # keep the lazy graph one step long
            for i, t in enumerate(next_ids.tolist()):
                if not done[i]:
                    out[i].append(t)
                    done[i] = t in stop
            if all(done):
                break
            x, seg = next_ids[:, None].astype(mx.int32), None  # continue each row's document
        return out

    # ---- training -------------------------------------------------------------------------------

    def world(self) -> tuple[int, int]:
        """(rank, size) of the mx.distributed group this process joined; (0, 1) alone."""
        group = dp.world_group()
        return group.rank(), group.size()

    def init_train_state(self, model: Model, optim: OptimConfig, seed: int = 0,
                         compile: bool | None = None, parallel: str | None = None) -> steps.TrainState:  # fmt: skip
        """AdamW and counters at step 0; compile defaults to HANYEONG_MLX_COMPILE (on).
        parallel='ddp': one rank of the process's group, with rank 0's weights ('fsdp': ConfigError)."""
        group = dp.data_parallel_group(parallel)
        mx.random.seed(seed)  # for anything random in training (none yet: no dropout)
        if group is not None:
            dp.check_same_position(0, 0, group)
            dp.broadcast_weights(model, group)
        return steps.init_train_state(model, optim, seed, compile=compile, group=group)

    def load_train_state(self, path: str | Path, compile: bool | None = None,
                         parallel: str | None = None) -> steps.TrainState:  # fmt: skip
        """Model, AdamW moments and counters of a training checkpoint (either backend's), to go on.
        parallel='ddp': every rank of the group loads the same checkpoint."""
        group = dp.data_parallel_group(parallel)
        path = Path(path)
        model = self.load(path)
        meta = read_trainer_state(path)
        if not (path / OPTIMIZER_FILE).is_file():
            raise CheckpointError(f"{path}: no {OPTIMIZER_FILE}: cannot resume the optimizer")
        if group is not None:
            dp.check_same_position(int(meta["step"]), int(meta["tokens_seen"]), group)
        optim = OptimConfig.from_dict(meta["optim"])
        state = steps.init_train_state(model, optim, meta.get("seed", 0), compile=compile, group=group)
        state.step, state.tokens_seen = int(meta["step"]), int(meta["tokens_seen"])
        state.data_cursor = meta.get("data_cursor")
        file = path / OPTIMIZER_FILE
        steps.load_optimizer_tensors(state, read_tensors(file), str(file))
        mx.random.seed(
            state.seed
        )  # as init_train_state; a torch checkpoint's rng.torch means nothing here
        return state

    def train_step(
        self, state: steps.TrainState, batch: Batch, loss: str = "causal_lm"
    ) -> dict[str, float]:
        """One optimizer step on a global batch (data-parallel: this rank's rows of it); returns the
        global batch's loss, grad_norm, lr, tokens, counted_tokens."""
        return steps.train_step(state, batch, loss)


BACKEND = MLXBackend()
