"""The checkpoint format both backends read and write: a directory, written whole or not at all.

    CKPT/spec.json               the ModelSpec
    CKPT/model.safetensors       weights under Hugging Face Llama names (see `parameter_names`)
    CKPT/optimizer.safetensors   when training: AdamW moments, "<param>.exp_avg" / "<param>.exp_avg_sq"
    CKPT/trainer_state.json      when training: step, tokens seen, optimizer config, RNG, data cursor
    CKPT/checkpoint.json         format version, and the size and SHA-256 of every file above

A multi-worker FSDP stage writes the SHARDED layout instead (cuda_model/sharded.py): the weights and
moments under the same names, each rank writing the pieces it holds, so no process ever holds more
than its shard; any worker count reads it back, and `hanyeong model consolidate` turns it into the
single-file layout (the one export-hf, the MLX backend and single-worker runs write):

    CKPT/sharded/shard-NNNNN-model-00001-of-00001.safetensors   rank NNNNN-1's pieces (DCP offsets in
                                                                 the header), weights and moments
    CKPT/model.safetensors       optional: the weights consolidated (a stage's final checkpoint has them)

Backends do the tensor I/O with their own framework (safetensors files are framework-neutral);
this module owns the names, the atomic write and the integrity check, and never unpickles.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hanyeong.errors import CheckpointError
from hanyeong.files import ordinary_mode
from orchestration.core.spec import ModelSpec

FORMAT = "hanyeong-checkpoint"
VERSION = 1
SPEC_FILE = "spec.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"
INDEX_FILE = "checkpoint.json"
SHARDED_DIR = "sharded"  # the SHARDED layout's folder of per-rank safetensors files
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")
SCORE = "score.weight"  # a reward model's head: LlamaForSequenceClassification's name


def parameter_names(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor of `model.safetensors` with its shape: the Hugging Face Llama names.

    A tied model stores no `lm_head.weight` (as transformers does); loaders tie it to the embedding.
    A reward model (spec.head 'score') stores `score.weight` [1, d_model] and no `lm_head.weight`,
    as transformers' LlamaForSequenceClassification (num_labels=1) names and holds them: it never
    predicts tokens, so it carries no vocab x d_model head.
    """
    d, kv, ff = spec.d_model, spec.n_kv_heads * spec.head_dim, spec.d_ff
    names: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (spec.vocab_size, d)}
    for i in range(spec.n_layers):
        p = f"model.layers.{i}."
        names.update({
            p + "input_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (d, d),
            p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d),
            p + "self_attn.o_proj.weight": (d, d),
            p + "post_attention_layernorm.weight": (d,),
            p + "mlp.gate_proj.weight": (ff, d),
            p + "mlp.up_proj.weight": (ff, d),
            p + "mlp.down_proj.weight": (d, ff),
        })  # fmt: skip
    names["model.norm.weight"] = (d,)
    if spec.head == "score":
        names[SCORE] = (1, d)
    elif not spec.tie_embeddings:
        names["lm_head.weight"] = (spec.vocab_size, d)
    return names


def optimizer_key(parameter: str, moment: str) -> str:
    """Name of an AdamW moment of `parameter` in optimizer.safetensors."""
    return f"{parameter}.{moment}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def writing(path: str | Path, spec: ModelSpec) -> Iterator[Path]:
    """Yield a temporary directory to write a checkpoint into; on success it replaces `path`.

    The spec and the index (sizes, checksums) are written here, and every file gets the mode
    ordinary files get (0666 less the umask), whatever library wrote it. A crash or an exception inside
    the block leaves `path` as it was (the previous checkpoint, or nothing).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        spec.save(tmp / SPEC_FILE)
        yield tmp
        written = sorted(f for f in tmp.rglob("*") if f.is_file())  # the SHARDED folder's files too
        for f in written:
            ordinary_mode(f)  # safetensors writes 0600; a checkpoint's files are all alike
        files = {
            f.relative_to(tmp).as_posix(): {"bytes": f.stat().st_size, "sha256": _sha256(f)}
            for f in written
            if f.name != INDEX_FILE
        }
        index = {"format": FORMAT, "version": VERSION, "files": files}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        _fsync_dir(tmp)
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.exists():
            os.replace(path, old)  # a directory cannot be replaced in one rename; keep it until the new one is in
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def recover(path: str | Path) -> bool:
    """Undo what a writer killed mid-`writing` left beside `path`; True when a checkpoint came back.

    A kill between its two renames leaves the previous checkpoint as `.NAME.old-PID` and no `path`:
    it is put back (the newest such, by its index file), so a resumed stage finds it instead of
    starting over. An `.old-PID` beside a `path` that is there is the replaced one: removed. A
    `.NAME.tmp-PID` of another process is a killed writer's half-written folder: removed (one writer
    per checkpoint path: a stage's rank 0, under the run's lock)."""
    path = Path(path)
    if not path.parent.is_dir():
        return False
    olds = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda d: (d / INDEX_FILE).stat().st_mtime
                  if (d / INDEX_FILE).is_file() else 0.0)  # fmt: skip
    restored = False
    if olds and not path.exists() and (olds[-1] / INDEX_FILE).is_file():
        os.replace(olds.pop(), path)
        restored = True
    for stale in olds + [t for t in path.parent.glob(f".{path.name}.tmp-*") if t.name != f".{path.name}.tmp-{os.getpid()}"]:
        shutil.rmtree(stale, ignore_errors=True)
    return restored


def _fsync_dir(directory: Path) -> None:
    for f in directory.iterdir():
        if f.is_dir():
            _fsync_dir(f)
            continue
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())


def verify(path: str | Path, checksums: bool = False) -> dict:
    """Check a checkpoint directory is whole: every indexed file present at its size (and hash).

    Returns the index. Raises CheckpointError naming the problem: missing directory, not a
    hanyeong checkpoint, a missing or truncated file.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no checkpoint directory there")
    index_file = path / INDEX_FILE
    if not index_file.is_file():
        raise CheckpointError(f"{path}: not a hanyeong checkpoint (no {INDEX_FILE}); was it written completely?")
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{index_file}: damaged ({err})") from None
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint format {index.get('format')} v{index.get('version')}, expected {FORMAT} v{VERSION}")
    for name, meta in index["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing from the checkpoint")
        size = file.stat().st_size
        if size != meta["bytes"]:
            raise CheckpointError(f"{file}: {size:,} bytes, expected {meta['bytes']:,} (truncated or overwritten)")
        if checksums and _sha256(file) != meta["sha256"]:
            raise CheckpointError(f"{file}: checksum mismatch (the file was altered after it was written)")
    if SPEC_FILE not in index["files"]:
        raise CheckpointError(f"{path}: no {SPEC_FILE} in the checkpoint")
    if MODEL_FILE not in index["files"] and not sharded_files(index):
        raise CheckpointError(f"{path}: no {MODEL_FILE} (nor a {SHARDED_DIR}/ folder) in the checkpoint")
    return index


def sharded_files(index: dict) -> list[str]:
    """The SHARDED layout's files of a checkpoint index (none in a single-file checkpoint)."""
    return [name for name in index["files"] if name.startswith(SHARDED_DIR + "/")]


def is_sharded(path: str | Path) -> bool:
    """Whether a checkpoint holds its weights and moments in the SHARDED layout."""
    return (Path(path) / SHARDED_DIR).is_dir()


def has_weights_file(path: str | Path) -> bool:
    """Whether the weights are in one model.safetensors (single-file, or sharded and consolidated)."""
    return (Path(path) / MODEL_FILE).is_file()


def weights_file(path: str | Path) -> Path:
    """CKPT/model.safetensors, for readers of the single-file layout; a sharded checkpoint without
    it is one clear error saying how to make it."""
    if not has_weights_file(path) and is_sharded(path):
        raise CheckpointError(f"{path}: a sharded checkpoint (an FSDP stage's pieces) without {MODEL_FILE}; "
                              f"run `hanyeong model consolidate {path}` first")  # fmt: skip
    return Path(path) / MODEL_FILE


def load_spec(path: str | Path) -> ModelSpec:
    """The spec of a verified checkpoint."""
    verify(path)
    return ModelSpec.load(Path(path) / SPEC_FILE)


def has_training_state(path: str | Path) -> bool:
    path = Path(path)
    moments = (path / OPTIMIZER_FILE).is_file() or is_sharded(path)  # the sharded layout holds them
    return moments and (path / TRAINER_STATE_FILE).is_file()


def read_trainer_state(path: str | Path) -> dict:
    file = Path(path) / TRAINER_STATE_FILE
    if not file.is_file():
        raise CheckpointError(f"{path}: no {TRAINER_STATE_FILE}: a weights-only checkpoint cannot resume training")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file}: damaged ({err})") from None


def write_trainer_state(directory: Path, state: dict) -> None:
    (directory / TRAINER_STATE_FILE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")


def check_tensors(spec: ModelSpec, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """Refuse weights whose names or shapes are not those the spec implies, naming the first few."""
    expected = parameter_names(spec)
    missing = sorted(set(expected) - set(shapes))
    # a tied checkpoint written by a tool that saves the head anyway is accepted (it equals the embedding)
    allowed = {"lm_head.weight"} if spec.tie_embeddings and spec.head == "lm" else set()
    extra = sorted(set(shapes) - set(expected) - allowed)
    wrong = sorted(n for n in set(expected) & set(shapes) if tuple(shapes[n]) != expected[n])
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}")
    if extra:
        problems.append(f"unexpected {', '.join(extra[:3])}{' …' if len(extra) > 3 else ''}")
    if wrong:
        n = wrong[0]
        problems.append(f"{n} has shape {tuple(shapes[n])}, the spec says {expected[n]}")
    if problems:
        raise CheckpointError(f"{where}: weights do not match spec.json: " + "; ".join(problems))


def with_score_head(source: str | Path, spec: ModelSpec, out: str | Path, seed: int) -> Path:
    """A reward model's start at `out`: `source`'s weights (a language model's) without its LM head,
    plus a fresh `score.weight` [1, d_model] drawn from N(0, spec.score_init_std) by numpy's
    Generator(seed), so both backends start from the same head; `spec` says head 'score'. Written
    atomically; no framework needed (safetensors' numpy API)."""
    import numpy as np
    from safetensors import SafetensorError
    from safetensors.numpy import load_file, save_file

    file = weights_file(source)
    try:
        tensors = load_file(file)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{file}: cannot read the tensors ({err})") from None
    tensors.pop("lm_head.weight", None)
    draw = np.random.default_rng(seed).normal(0.0, spec.score_init_std, (1, spec.d_model))
    tensors[SCORE] = draw.astype(np.float32)
    check_tensors(spec, {k: tuple(v.shape) for k, v in tensors.items()}, str(file))
    with writing(out, spec) as tmp:
        save_file(tensors, tmp / MODEL_FILE, metadata={"format": "pt"})
    return Path(out)
