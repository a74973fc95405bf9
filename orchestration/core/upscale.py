"""`hanyeong model upscale`: depth up-scaling (SOLAR 10.7B, Kim et al. 2023).

SOLAR takes a 32-layer model, keeps layers [0, 24) of one copy and [8, 32) of another, stacks them
into 48 layers and continues pretraining. Here any list of half-open layer ranges, in order, makes
the new stack: "0:24,8:32" is SOLAR's. Every layer is copied bit for bit from its source layer; the
embeddings, final norm and head are unchanged; the spec's n_layers follows. The output is a
weights-only checkpoint (the optimizer's moments have no place in a new depth).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from hanyeong.errors import CheckpointError, ConfigError
from orchestration.core.checkpoint import MODEL_FILE, load_spec, weights_file, writing
from orchestration.core.spec import ModelSpec

LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def parse_layers(text: str, n_layers: int) -> list[int]:
    """"0:24,8:32" -> the source layer of each new layer; ConfigError (one line) when a range is
    malformed, empty or outside [0, n_layers)."""
    sources: list[int] = []
    for part in str(text).split(","):
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", part)
        if not match:
            raise ConfigError(f"layers: {part.strip()!r} is not a range START:END (e.g. 0:24,8:32)")
        start, end = int(match[1]), int(match[2])
        if not start < end <= n_layers:
            raise ConfigError(f"layers: {start}:{end} must satisfy 0 <= start < end <= {n_layers} (the model's layers)")
        sources += range(start, end)
    return sources


def upscaled_spec(spec: ModelSpec, layers: str) -> ModelSpec:
    """The spec after up-scaling: n_layers = the ranges' total (what `model plan` sizes)."""
    return dataclasses.replace(spec, n_layers=len(parse_layers(layers, spec.n_layers)))


def upscale(ckpt: str | Path, layers: str, out: str | Path) -> Path:
    """Write the up-scaled checkpoint of `ckpt` to `out` (atomically)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.numpy import save_file

    spec = load_spec(ckpt)
    sources = parse_layers(layers, spec.n_layers)
    new_spec = dataclasses.replace(spec, n_layers=len(sources))
    tensors = {}
    try:
        with safe_open(weights_file(ckpt), framework="numpy") as f:
            by_layer: dict[int, list[str]] = {}
            for name in f.keys():
                match = LAYER.match(name)
                if match:
                    by_layer.setdefault(int(match[1]), []).append(match[2])
                else:
                    tensors[name] = f.get_tensor(name)  # embeddings, final norm, head
            for new, old in enumerate(sources):
                for rest in by_layer.get(old, []):
                    tensors[f"model.layers.{new}.{rest}"] = f.get_tensor(f"model.layers.{old}.{rest}")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{ckpt}: cannot read the weights ({err})") from None
    with writing(out, new_spec) as tmp:
        save_file(tensors, tmp / MODEL_FILE, metadata={"format": "pt"})
    return Path(out)
