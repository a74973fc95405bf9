"""The checkpoint directory: written whole or not at all, refused when damaged, never unpickled."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from orchestration.core import checkpoint
from hanyeong.errors import CheckpointError
from orchestration.core.presets import PRESETS

SPEC = PRESETS["tiny"].replace(vocab_size=300)


def random_weights(spec, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in checkpoint.parameter_names(spec).items()}


def write(path, weights, spec=SPEC):
    with checkpoint.writing(path, spec) as tmp:
        save_file(weights, str(tmp / checkpoint.MODEL_FILE))


def test_written_checkpoint_verifies(tmp_path):
    write(tmp_path / "ckpt", random_weights(SPEC))
    index = checkpoint.verify(tmp_path / "ckpt", checksums=True)
    assert set(index["files"]) == {"spec.json", "model.safetensors"}
    assert checkpoint.load_spec(tmp_path / "ckpt") == SPEC
    assert not list(tmp_path.glob(".*"))  # no temporary directory left behind


def test_a_crash_while_writing_leaves_the_previous_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    write(ckpt, random_weights(SPEC, seed=1))
    before = (ckpt / checkpoint.MODEL_FILE).read_bytes()
    with pytest.raises(RuntimeError):
        with checkpoint.writing(ckpt, SPEC) as tmp:
            (tmp / checkpoint.MODEL_FILE).write_bytes(b"half a file")
            raise RuntimeError("killed mid-write")
    assert (ckpt / checkpoint.MODEL_FILE).read_bytes() == before
    checkpoint.verify(ckpt, checksums=True)
    assert not list(tmp_path.glob(".*"))


def test_truncated_file_is_refused_by_name(tmp_path):
    ckpt = tmp_path / "ckpt"
    write(ckpt, random_weights(SPEC))
    data = (ckpt / checkpoint.MODEL_FILE).read_bytes()
    (ckpt / checkpoint.MODEL_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        checkpoint.verify(ckpt)


def test_altered_file_fails_the_checksum(tmp_path):
    ckpt = tmp_path / "ckpt"
    write(ckpt, random_weights(SPEC))
    data = bytearray((ckpt / checkpoint.MODEL_FILE).read_bytes())
    data[-1] ^= 0xFF
    (ckpt / checkpoint.MODEL_FILE).write_bytes(bytes(data))
    checkpoint.verify(ckpt)  # same size: only the checksum sees it
    with pytest.raises(CheckpointError, match="checksum"):
        checkpoint.verify(ckpt, checksums=True)


@pytest.mark.parametrize("problem", ["no directory", "no index", "other format"])
def test_not_a_checkpoint(tmp_path, problem):
    ckpt = tmp_path / "ckpt"
    if problem != "no directory":
        write(ckpt, random_weights(SPEC))
        if problem == "no index":
            (ckpt / checkpoint.INDEX_FILE).unlink()
        else:
            (ckpt / checkpoint.INDEX_FILE).write_text(json.dumps({"format": "pickle", "version": 9, "files": {}}))
    with pytest.raises(CheckpointError, match=str(ckpt)):
        checkpoint.verify(ckpt)


def test_check_tensors_names_the_mismatch():
    shapes = {n: s for n, s in checkpoint.parameter_names(SPEC).items()}
    checkpoint.check_tensors(SPEC, shapes, "ckpt")
    wrong = {**shapes, "model.norm.weight": (7,)}
    with pytest.raises(CheckpointError, match=r"model.norm.weight has shape \(7,\)"):
        checkpoint.check_tensors(SPEC, wrong, "ckpt")
    missing = {n: s for n, s in shapes.items() if "layers.1." not in n}
    with pytest.raises(CheckpointError, match="missing model.layers.1"):
        checkpoint.check_tensors(SPEC, missing, "ckpt")


def test_tied_spec_has_no_lm_head_untied_has_one():
    assert "lm_head.weight" not in checkpoint.parameter_names(SPEC)
    assert checkpoint.parameter_names(SPEC.replace(tie_embeddings=False))["lm_head.weight"] == (300, SPEC.d_model)


def test_inspect_cli_reports_a_damaged_checkpoint_in_one_line(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    ckpt = tmp_path / "ckpt"
    write(ckpt, random_weights(SPEC))
    (ckpt / checkpoint.MODEL_FILE).write_bytes(b"x")
    out = subprocess.run([sys.executable, "-m", "orchestration.cli", "model", "inspect", str(ckpt)],
                         capture_output=True, text=True, cwd=REPO)  # fmt: skip
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error:") and "truncated" in out.stderr


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_every_file_of_a_checkpoint_has_the_ordinary_mode(tmp_path, mask):
    """safetensors writes 0600 through a private temporary file; a checkpoint on shared storage must
    be readable like its other files: 0666 less the umask, whatever library wrote it."""
    import os
    import stat

    from hanyeong.files import write_atomic

    old = os.umask(mask)
    try:
        with checkpoint.writing(tmp_path / "ckpt", SPEC) as tmp:
            save_file(random_weights(SPEC), str(tmp / checkpoint.MODEL_FILE))
            save_file({"a.exp_avg": np.zeros(3, np.float32)}, str(tmp / checkpoint.OPTIMIZER_FILE))
            checkpoint.write_trainer_state(tmp, {"step": 1})
        write_atomic(tmp_path / "manifest.json", "{}")
    finally:
        os.umask(old)
    files = [*sorted((tmp_path / "ckpt").iterdir()), tmp_path / "manifest.json"]
    assert {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {f.name: oct(0o666 & ~mask) for f in files}


def test_a_writer_killed_between_its_renames_leaves_a_checkpoint_that_recover_puts_back(tmp_path):
    """A kill after `path` was renamed to .NAME.old-PID and before the new folder took its place
    leaves no `path`; recover restores the old one and removes what dead writers left."""
    from orchestration.core.backends import get_backend
    from orchestration.core.spec import ModelSpec

    backend = get_backend("torch")
    spec = ModelSpec(vocab_size=300, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32)
    path = tmp_path / "checkpoint"
    backend.save(backend.init(spec, seed=0), path)
    before = (path / "checkpoint.json").read_bytes()
    path.rename(tmp_path / ".checkpoint.old-999999")  # the first rename done, the second never
    (tmp_path / ".checkpoint.tmp-999998").mkdir()  # a half-written folder of another dead writer
    assert not path.exists() and checkpoint.recover(path)
    assert (path / "checkpoint.json").read_bytes() == before and checkpoint.verify(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    (tmp_path / ".checkpoint.old-999997").mkdir()  # an old one beside a checkpoint that is there
    assert not checkpoint.recover(path) and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
