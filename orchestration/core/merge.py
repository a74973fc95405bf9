"""`hanyeong model average`: new weights from checkpoints of one spec, as the seeds merge models.

    linear  Σ w_i θ_i, weights normalised to sum 1 (uniform by default). Llama 3.1 averages models
            from runs with different data or hyperparameters at each post-training stage.
    ema     θ ← (1 − α) θ + α θ_i over the checkpoints in the order given (a stage's checkpoints,
            oldest first): the exponential moving average of a run.
    slerp   base + SLERP of the task vectors δ_i = θ_i − θ_base at t (Gemma 2's WARP, step 2:
            spherical interpolation keeps the task vectors' norm where a linear mean shrinks it).
    warp    slerp, then LITI toward the base: base + η (θ_slerp − base) (WARP, step 3: the result
            is the next iteration's start; η = 1 keeps the slerp, η = 0 returns the base).

SLERP is per tensor, as WARP does it "layer-wise" and mergekit per parameter; with more than two
task vectors it folds them in turn, the m-th at t = 1/m, so each gets an equal share of the angle
(for two: t as given). Where two task vectors are (anti)parallel or one is zero the angle is
undefined and the interpolation is linear. Every sum is taken in float64 and rounded once to the
checkpoints' dtype, so averaging a checkpoint with itself returns it bit for bit.

Inputs are read one tensor at a time (memory: the output plus one tensor per input). The output
is a weights-only checkpoint (no optimizer state: a merged model starts a new stage). Checkpoints
whose specs differ are refused with one line: their tensors do not correspond.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from dataclasses import dataclass

from hanyeong.errors import CheckpointError, ConfigError
from orchestration.core.checkpoint import MODEL_FILE, load_spec, weights_file, writing
from orchestration.core.spec import ModelSpec

METHODS = ("linear", "ema", "slerp", "warp")
PARALLEL = 1e-7  # |cos Ω| above 1 − this: no angle to interpolate along, so linear


def same_spec(checkpoints: Sequence[str | Path]) -> ModelSpec:
    """The one spec every checkpoint has; CheckpointError naming the first that differs."""
    specs = [load_spec(c) for c in checkpoints]
    for path, spec in zip(checkpoints[1:], specs[1:]):
        if spec != specs[0]:
            diff = sorted(k for k, v in spec.to_dict().items() if specs[0].to_dict().get(k) != v)
            raise CheckpointError(f"{path}: its spec differs from {checkpoints[0]}'s ({', '.join(diff)}): "
                                  "only checkpoints of one spec can be merged")  # fmt: skip
    return specs[0]


def linear(tensors: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Σ w_i x_i in float64 (weights already sum to 1)."""
    out = np.zeros(tensors[0].shape, np.float64)
    for x, w in zip(tensors, weights):
        out += w * x.astype(np.float64)
    return out


def ema(tensors: Sequence[np.ndarray], alpha: float) -> np.ndarray:
    """The moving average of the tensors in order, started at the first."""
    out = tensors[0].astype(np.float64)
    for x in tensors[1:]:
        out = (1 - alpha) * out + alpha * x.astype(np.float64)
    return out


def slerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """Spherical interpolation from a (t = 0) to b (t = 1), float64, as flat vectors; linear where
    the angle is undefined. The ends are returned exactly."""
    if t == 0 or t == 1:
        return (a if t == 0 else b).astype(np.float64)
    a, b = a.astype(np.float64), b.astype(np.float64)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    cos = float(np.dot(a.ravel(), b.ravel()) / (na * nb)) if na and nb else 1.0
    if abs(cos) > 1 - PARALLEL:
        return (1 - t) * a + t * b
    omega = math.acos(cos)
    return (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)


def slerp_all(deltas: Sequence[np.ndarray], t: float) -> np.ndarray:
    """Two task vectors at t; more folded in turn, the m-th (1-based) at 1/m."""
    if len(deltas) == 2:
        return slerp(deltas[0], deltas[1], t)
    out = deltas[0].astype(np.float64)
    for m, d in enumerate(deltas[1:], start=2):
        out = slerp(out, d, 1 / m)
    return out


def combiner(method: str, n: int, weights: Sequence[float] | None, alpha: float, t: float,
             eta: float, base: bool) -> Callable[[list[np.ndarray]], np.ndarray]:  # fmt: skip
    """f(tensors) -> float64 merged tensor; for slerp/warp tensors[0] is the base's. Checks the
    options (ConfigError, one line)."""
    if method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if (method in ("slerp", "warp")) != base:
        raise ConfigError(f"--base is {'needed' if not base else 'only'} for slerp and warp"
                          f"{'' if not base else ', not ' + method}")  # fmt: skip
    least = 2 if method in ("slerp", "warp") else 1
    if n < least:
        raise ConfigError(f"{method} needs at least {least} checkpoint{'s' * (least > 1)} besides --base, got {n}")
    if method == "linear":
        w = [1.0] * n if weights is None else [float(x) for x in weights]
        if len(w) != n or any(not 0 <= x < math.inf for x in w) or sum(w) <= 0:
            raise ConfigError(f"weights: {n} numbers >= 0 with a positive sum, one per checkpoint, got {list(w)}")
        w = [x / sum(w) for x in w]
        return lambda xs: linear(xs, w)
    if weights is not None:
        raise ConfigError(f"--weights is for the linear method, not {method}")
    if method == "ema":
        if not 0 < alpha <= 1:
            raise ConfigError(f"ema must be in (0, 1], got {alpha}")
        return lambda xs: ema(xs, alpha)
    if not 0 <= t <= 1:
        raise ConfigError(f"t must be in [0, 1], got {t}")
    if not 0 <= eta <= 1:
        raise ConfigError(f"eta must be in [0, 1], got {eta}")
    eta = eta if method == "warp" else 1.0

    def task_vectors(xs: list[np.ndarray]) -> np.ndarray:
        b = xs[0].astype(np.float64)
        merged = slerp_all([x.astype(np.float64) - b for x in xs[1:]], t)
        return b + eta * merged

    return task_vectors


def average(checkpoints: Sequence[str | Path], out: str | Path, method: str = "linear",
            weights: Sequence[float] | None = None, alpha: float = 0.1, t: float = 0.5, eta: float = 0.5,
            base: str | Path | None = None) -> Path:  # fmt: skip
    """Merge `checkpoints` (and `base`, for slerp/warp) into a weights-only checkpoint at `out`."""
    from safetensors import SafetensorError, safe_open
    from safetensors.numpy import save_file

    merge = combiner(method, len(checkpoints), weights, alpha, t, eta, base is not None)
    paths = [Path(p) for p in ([base] if base is not None else []) + list(checkpoints)]
    spec = same_spec(paths)
    merged: dict[str, np.ndarray] = {}
    try:
        with ExitStack() as stack:
            files = [stack.enter_context(safe_open(weights_file(p), framework="numpy")) for p in paths]
            for name in sorted(files[0].keys()):
                tensors = [f.get_tensor(name) for f in files]
                merged[name] = merge(tensors).astype(tensors[0].dtype)
    except (SafetensorError, OSError, KeyError, TypeError) as err:
        raise CheckpointError(f"cannot read the weights to merge ({err})") from None
    with writing(out, spec) as tmp:
        save_file(merged, tmp / MODEL_FILE, metadata={"format": "pt"})
    return Path(out)


@dataclass(frozen=True)
class MergeSettings:
    """`[stage.merge]`: the stage starts from a merge of earlier stages' final checkpoints (WARP as
    a recipe step: M policies trained from one start, merged, then the next round trains from it)."""

    stages: tuple[str, ...]
    """The earlier stages merged (their final checkpoints): M policies from the stage's `start`."""
    method: str = "warp"
    """'linear', 'slerp' or 'warp' (slerp and warp take the stage's start as the base)."""
    weights: tuple[float, ...] | None = None
    """linear: one weight per stage (normalised); None: uniform."""
    t: float = 0.5
    """slerp/warp with two policies: 0 gives the first, 1 the second."""
    eta: float = 0.5
    """warp: how far from the start toward the slerp (LITI)."""

    def __post_init__(self) -> None:
        if not self.stages or not all(isinstance(n, str) and n for n in self.stages):
            raise ConfigError(f"stages must name the earlier stages to merge, got {self.stages!r}")
        if self.method == "ema":
            raise ConfigError("method: ema merges a run's checkpoints in order; a stage merges stages: use linear, slerp or warp")
        combiner(self.method, len(self.stages), self.weights, 0.1, self.t, self.eta, self.method in ("slerp", "warp"))
