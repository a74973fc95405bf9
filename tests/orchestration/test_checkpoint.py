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


# ---- laws added for mutation testing (benchmarks/mutations.py) ----------------------------------

UNTIED = SPEC.replace(tie_embeddings=False)


def sha256(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_checkpoint_made_by_hand_from_the_format_description_is_read(tmp_path):
    """The format of the module docstring, written without the module: spec.json, model.safetensors,
    and checkpoint.json with format 'hanyeong-checkpoint', version 1 and every file's size and
    sha256. It verifies and loads, and `writing` indexes the same files the same way."""
    ckpt = tmp_path / "by-hand"
    ckpt.mkdir()
    (ckpt / "spec.json").write_text(json.dumps(SPEC.to_dict()))
    save_file(random_weights(SPEC), str(ckpt / "model.safetensors"))
    files = {f.name: {"bytes": f.stat().st_size, "sha256": sha256(f)} for f in sorted(ckpt.iterdir())}
    (ckpt / "checkpoint.json").write_text(json.dumps({"format": "hanyeong-checkpoint", "version": 1, "files": files}))
    assert checkpoint.verify(ckpt, checksums=True)["files"] == files
    assert checkpoint.load_spec(ckpt) == SPEC

    write(tmp_path / "written", random_weights(SPEC))
    written = json.loads((tmp_path / "written" / "checkpoint.json").read_text())
    assert {k: v for k, v in written.items() if k != "files"} == {"format": "hanyeong-checkpoint", "version": 1}
    assert written["files"] == {f.name: {"bytes": f.stat().st_size, "sha256": sha256(f)}
                                for f in (tmp_path / "written").iterdir() if f.name != "checkpoint.json"}  # fmt: skip


def test_another_version_of_the_format_is_refused(tmp_path):
    ckpt = tmp_path / "ckpt"
    write(ckpt, random_weights(SPEC))
    index = json.loads((ckpt / "checkpoint.json").read_text())
    (ckpt / "checkpoint.json").write_text(json.dumps({**index, "version": index["version"] + 1}))
    with pytest.raises(CheckpointError, match="v2, expected hanyeong-checkpoint v1"):
        checkpoint.verify(ckpt)


def test_an_index_without_the_weights_is_refused(tmp_path):
    ckpt = tmp_path / "ckpt"
    write(ckpt, random_weights(SPEC))
    index = json.loads((ckpt / "checkpoint.json").read_text())
    del index["files"]["model.safetensors"]
    (ckpt / "checkpoint.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        checkpoint.verify(ckpt)


def test_load_spec_refuses_a_damaged_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    write(ckpt, random_weights(SPEC))
    (ckpt / "model.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="truncated"):
        checkpoint.load_spec(ckpt)


def test_writing_makes_the_folders_and_replaces_a_checkpoint_whole(tmp_path):
    ckpt = tmp_path / "a" / "b" / "ckpt"
    write(ckpt, random_weights(SPEC, seed=1))
    second = random_weights(SPEC, seed=2)
    write(ckpt, second)
    from safetensors.numpy import load_file

    assert all(np.array_equal(v, second[k]) for k, v in load_file(ckpt / "model.safetensors").items())
    checkpoint.verify(ckpt, checksums=True)
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["ckpt"]  # no .old or .tmp folder left


def test_a_block_that_copies_a_whole_checkpoint_in_gets_a_fresh_index(tmp_path):
    """The files of another checkpoint copied in, its checkpoint.json too: the index is rewritten."""
    import shutil

    write(tmp_path / "source", random_weights(SPEC))
    with checkpoint.writing(tmp_path / "copy", SPEC) as tmp:
        for f in (tmp_path / "source").iterdir():
            shutil.copyfile(f, tmp / f.name)
    index = checkpoint.verify(tmp_path / "copy", checksums=True)
    assert set(index["files"]) == {"spec.json", "model.safetensors"}


def test_the_next_writer_clears_what_dead_writers_left(tmp_path):
    """Folders of killed writers (another process's .tmp, and a stale one of this very process id,
    whose files must not end up in the checkpoint) are gone after the next write."""
    import os

    (tmp_path / ".ckpt.tmp-999999").mkdir()
    own = tmp_path / f".ckpt.tmp-{os.getpid()}"
    own.mkdir()
    (own / "stale.bin").write_bytes(b"from a writer that died")
    write(tmp_path / "ckpt", random_weights(SPEC))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert set(checkpoint.verify(tmp_path / "ckpt")["files"]) == {"spec.json", "model.safetensors"}


def test_debris_that_cannot_be_removed_does_not_stop_a_writer(tmp_path):
    """A file named like a writer's temporary folder is not a folder: recover leaves it, and writes go on."""
    (tmp_path / ".ckpt.tmp-999999").write_bytes(b"not a folder")
    assert not checkpoint.recover(tmp_path / "ckpt")
    write(tmp_path / "ckpt", random_weights(SPEC))
    checkpoint.verify(tmp_path / "ckpt", checksums=True)


def test_recover_without_a_parent_folder_and_with_several_old_ones(tmp_path):
    import os

    assert checkpoint.recover(tmp_path / "none" / "ckpt") is False
    for k, age in enumerate((300, 100, 200)):  # three replaced checkpoints; the one of age 100 is newest
        write(tmp_path / f"w{k}", random_weights(SPEC, seed=k))
        index = tmp_path / f"w{k}" / "checkpoint.json"
        os.utime(index, (index.stat().st_atime, index.stat().st_mtime - age))
        (tmp_path / f"w{k}").rename(tmp_path / f".ckpt.old-{1000 + k}")
    newest = (tmp_path / ".ckpt.old-1001" / "model.safetensors").read_bytes()
    assert checkpoint.recover(tmp_path / "ckpt") is True
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == newest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_training_state_needs_both_files(tmp_path):
    with checkpoint.writing(tmp_path / "w", SPEC) as tmp:
        save_file(random_weights(SPEC), str(tmp / "model.safetensors"))
        save_file({"model.norm.weight.exp_avg": np.zeros(3, np.float32)}, str(tmp / "optimizer.safetensors"))
    assert not checkpoint.has_training_state(tmp_path / "w")
    with checkpoint.writing(tmp_path / "t", SPEC) as tmp:
        save_file(random_weights(SPEC), str(tmp / "model.safetensors"))
        checkpoint.write_trainer_state(tmp, {"step": 3})
    assert not checkpoint.has_training_state(tmp_path / "t")
    (tmp_path / "t" / "optimizer.safetensors").write_bytes(b"")
    assert checkpoint.has_training_state(tmp_path / "t")
    assert json.loads((tmp_path / "t" / "trainer_state.json").read_text()) == {"step": 3}
    assert checkpoint.read_trainer_state(tmp_path / "t") == {"step": 3}


def test_reward_models_have_a_score_head_and_no_lm_head():
    """transformers' LlamaForSequenceClassification (num_labels=1): `score.weight` [1, d_model]."""
    for spec in (SPEC.replace(head="score"), UNTIED.replace(head="score")):
        names = checkpoint.parameter_names(spec)
        assert names["score.weight"] == (1, spec.d_model) and "lm_head.weight" not in names
        assert set(names) - {"score.weight"} == set(checkpoint.parameter_names(SPEC))


def test_check_tensors_refuses_extra_tensors_and_a_reward_models_lm_head():
    shapes = dict(checkpoint.parameter_names(SPEC))
    with pytest.raises(CheckpointError, match="unexpected model.extra.weight"):
        checkpoint.check_tensors(SPEC, {**shapes, "model.extra.weight": (3,)}, "ckpt")
    checkpoint.check_tensors(SPEC, {**shapes, "lm_head.weight": (300, SPEC.d_model)}, "ckpt")  # tied: a copy
    reward = SPEC.replace(head="score")
    score = dict(checkpoint.parameter_names(reward))
    with pytest.raises(CheckpointError, match="unexpected lm_head.weight"):
        checkpoint.check_tensors(reward, {**score, "lm_head.weight": (300, SPEC.d_model)}, "ckpt")


def test_with_score_head_swaps_the_lm_head_for_a_seeded_score_head(tmp_path):
    """The language model's tensors without its head, plus score.weight drawn from
    N(0, score_init_std) by numpy's Generator(seed); a file transformers loads (metadata format 'pt')."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    source = random_weights(UNTIED, seed=4)
    write(tmp_path / "lm", source, UNTIED)
    reward = UNTIED.replace(head="score")
    out = checkpoint.with_score_head(str(tmp_path / "lm"), reward, str(tmp_path / "rm"), seed=7)
    assert out == tmp_path / "rm"
    checkpoint.verify(out, checksums=True)
    assert checkpoint.load_spec(out) == reward
    tensors = load_file(out / "model.safetensors")
    assert set(tensors) == set(source) - {"lm_head.weight"} | {"score.weight"}
    assert all(np.array_equal(tensors[k], v) for k, v in source.items() if k != "lm_head.weight")
    expected = np.random.default_rng(7).normal(0.0, reward.score_init_std, (1, reward.d_model)).astype(np.float32)
    np.testing.assert_array_equal(tensors["score.weight"], expected)
    assert abs(float(tensors["score.weight"].mean())) < 4 * reward.score_init_std / np.sqrt(reward.d_model)
    with safe_open(out / "model.safetensors", "np") as f:
        assert f.metadata() == {"format": "pt"}
    with pytest.raises(CheckpointError, match="do not match spec.json"):
        checkpoint.with_score_head(tmp_path / "lm", reward.replace(d_ff=reward.d_ff * 2), tmp_path / "bad", seed=7)
    assert not (tmp_path / "bad").exists()
