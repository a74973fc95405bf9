"""A distill stage through run_stage: the cached teacher gives the live teacher's losses and weights;
the cache is computed again when the teacher changes, refuses rows it does not hold, and a stage
resumed with another teacher is refused; a killed and rerun stage ends on an uninterrupted run's
weights, reading the cache back; Ray tasks compute the cache the stage's process computes; the
[stage.distill] table and the recipe checks."""

# ruff: noqa: E402  (the imports below follow the importorskip that guards them)

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cuda_model.backend import BACKEND
from hanyeong.errors import CheckpointError, ConfigError, DataError
from orchestration.core.batch import Batch
from orchestration.core.presets import PRESETS
from orchestration.pipeline import teacher_cache
from orchestration.pipeline.recipe import Recipe
from orchestration.pipeline.stage import build_loader, run_stage
from tests.orchestration.test_stage import datasets, metrics, one_thread, weights  # noqa: F401  (fixtures)

VOCAB, T, ROWS, STEPS = 3000, 32, 8, 6


def save_teacher(path: Path, seed: int, n_layers: int = 3) -> Path:
    """A teacher of another shape than the tiny student (3 layers), same vocabulary."""
    BACKEND.save(BACKEND.init(PRESETS["tiny"].replace(vocab_size=VOCAB, n_layers=n_layers), seed=seed), path)
    return path


def tables(tokenizer, datasets: dict, teacher: str, **distill) -> dict:
    stage = {"name": "student", "kind": "distill", "start": "init", "token_budget": T * ROWS * STEPS, "seq_len": T,
             "batch_tokens": T * ROWS, "checkpoint_every_tokens": T * ROWS * 3,
             "data": {"sources": [{"dataset": "general", "weight": 1.0}]}, "optim": {"lr": 3e-3, "warmup_steps": 1},
             "distill": {"teacher": teacher, **distill}}  # fmt: skip
    return {"run": {"name": "t", "preset": "tiny", "vocab_size": VOCAB, "backend": "torch",
                    "tokenizer": {"path": str(tokenizer)}, "datasets": [{"name": "general", "path": datasets["general"]}]},
            "stage": [stage]}  # fmt: skip


def request(tables: dict, stage_dir: Path, tokenizer, datasets: dict) -> dict:
    return {"recipe": Recipe.from_dict(tables).to_dict(), "index": 0, "stage_dir": str(stage_dir),
            "tokenizer": str(tokenizer), "datasets": datasets, "backend": "torch"}  # fmt: skip


SOFT = {"objective": "soft", "temperature": 2.0, "top_k": 8, "mix": 0.2}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return save_teacher(tmp_path_factory.mktemp("teacher") / "ckpt", seed=5)


@pytest.fixture(scope="module")
def cached(small_tokenizer_dir, datasets, teacher, tmp_path_factory):  # noqa: F811
    """The soft stage with the teacher cached, uninterrupted: (stage dir, result)."""
    stage_dir = tmp_path_factory.mktemp("cached") / "student"
    t = tables(small_tokenizer_dir, datasets, str(teacher), **SOFT)
    return stage_dir, run_stage(request(t, stage_dir, small_tokenizer_dir, datasets))


def cache_dirs(stage_dir: Path) -> list[Path]:
    return sorted(p for p in (stage_dir / teacher_cache.CACHE_DIR).iterdir() if p.is_dir())


def test_cached_and_live_teachers_give_the_same_losses_and_weights(cached, small_tokenizer_dir, datasets, teacher,
                                                                  tmp_path):  # noqa: F811  # fmt: skip
    stage_dir, result = cached
    [cache] = cache_dirs(stage_dir)
    assert (cache / teacher_cache.INDEX).is_file() and result["tokens"] == T * ROWS * STEPS
    live_dir = tmp_path / "live"
    live = run_stage(request(tables(small_tokenizer_dir, datasets, str(teacher), teacher_run="live", **SOFT),
                             live_dir, small_tokenizer_dir, datasets))  # fmt: skip
    assert not (live_dir / teacher_cache.CACHE_DIR).exists()  # nothing stored
    keys = ("loss", "distill/ce", "distill/kd", "distill/agreement")
    assert [[line[k] for k in keys] for line in metrics(live_dir)] == [[line[k] for k in keys] for line in metrics(stage_dir)]
    expected, got = weights(result["checkpoint"]), weights(live["checkpoint"])
    assert all(np.array_equal(got[name], expected[name]) for name in expected)
    losses = [line["loss"] for line in metrics(stage_dir)]
    assert losses[-1] < losses[0]


def stage_loader(tokenizer, datasets: dict, teacher: Path):
    """A fresh loader of the cached stage: the batches it draws, from the start."""
    recipe = Recipe.from_dict(tables(tokenizer, datasets, str(teacher), **SOFT))
    return build_loader(recipe.stage[0], datasets, seed=recipe.run.seed)


def test_the_cache_holds_the_live_teachers_top_k_of_every_batch(cached, small_tokenizer_dir, datasets, teacher):  # noqa: F811
    stage_dir, _ = cached
    [cache] = cache_dirs(stage_dir)
    read = teacher_cache.TeacherCache(cache)
    assert read.top_k == 8 and len(read.entries) == STEPS
    batch = stage_loader(small_tokenizer_dir, datasets, teacher).next_batch()
    ids, logprobs = teacher_cache.teacher_topk(BACKEND, BACKEND.load(teacher), batch, 8)
    got_ids, got_logprobs = read(batch)
    assert np.array_equal(got_ids, ids) and np.array_equal(got_logprobs, logprobs)
    assert (np.diff(logprobs, axis=-1) <= 0).all() and (logprobs <= 0).all()
    other = Batch(batch.inputs[:, ::-1].copy(), batch.targets, segment_ids=batch.segment_ids)
    with pytest.raises(DataError, match="the teacher cache holds no batch of these rows"):
        read(other)


def test_a_changed_teacher_is_computed_again_or_refused(small_tokenizer_dir, datasets, tmp_path):  # noqa: F811
    path = save_teacher(tmp_path / "teacher", seed=1)
    stage_dir = tmp_path / "student"
    t = tables(small_tokenizer_dir, datasets, str(path), **SOFT)
    real = BACKEND.train_step

    def crashing(state, batch, loss="causal_lm"):
        raise RuntimeError("killed before the first step")

    BACKEND.train_step = crashing
    try:
        with pytest.raises(RuntimeError, match="killed"):
            run_stage(request(t, stage_dir, small_tokenizer_dir, datasets))
    finally:
        BACKEND.train_step = real
    [first] = cache_dirs(stage_dir)
    save_teacher(path, seed=2)  # the teacher replaced in place, before any checkpoint
    result = run_stage(request(t, stage_dir, small_tokenizer_dir, datasets))
    [second] = cache_dirs(stage_dir)  # computed again; the old one removed
    assert second != first
    live_dir = tmp_path / "live"
    run_stage(request(tables(small_tokenizer_dir, datasets, str(path), teacher_run="live", **SOFT),
                      live_dir, small_tokenizer_dir, datasets))  # fmt: skip
    assert [x["loss"] for x in metrics(stage_dir)] == [x["loss"] for x in metrics(live_dir)]
    save_teacher(path, seed=3)  # after the stage's checkpoint: resuming is refused (the identity
    with pytest.raises(CheckpointError, match="written by another version of this stage"):  # hashes it)
        run_stage(request(t, stage_dir, small_tokenizer_dir, datasets))
    save_teacher(path, seed=2)
    assert run_stage(request(t, stage_dir, small_tokenizer_dir, datasets))["tokens"] == result["tokens"]
    # a teacher stage run again to other weights keeps its identity: distill.json still tells
    (stage_dir / "distill.json").write_text(json.dumps({"teacher": "0" * 64}))
    with pytest.raises(CheckpointError, match="started with another teacher"):
        run_stage(request(t, stage_dir, small_tokenizer_dir, datasets))


def test_a_killed_and_rerun_stage_equals_an_uninterrupted_one(cached, small_tokenizer_dir, datasets, teacher,
                                                             tmp_path, monkeypatch):  # noqa: F811  # fmt: skip
    uninterrupted_dir, uninterrupted = cached
    stage_dir = tmp_path / "student"
    t = tables(small_tokenizer_dir, datasets, str(teacher), **SOFT)
    real = BACKEND.train_step

    def crashing(state, batch, loss="causal_lm"):
        if state.step == 4:  # after step 4; the checkpoint was written after step 3
            raise RuntimeError("simulated crash")
        return real(state, batch, loss)

    monkeypatch.setattr(BACKEND, "train_step", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_stage(request(t, stage_dir, small_tokenizer_dir, datasets))
    monkeypatch.setattr(BACKEND, "train_step", real)

    def computed_again(job):
        raise AssertionError("the cache was computed again")

    monkeypatch.setattr(teacher_cache, "compute_shard", computed_again)
    result = run_stage(request(t, stage_dir, small_tokenizer_dir, datasets))
    assert result["resumed_from_step"] == 3 and result["tokens"] == uninterrupted["tokens"]
    assert [x["loss"] for x in metrics(stage_dir)] == [x["loss"] for x in metrics(uninterrupted_dir)]
    expected, got = weights(uninterrupted["checkpoint"]), weights(result["checkpoint"])
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-6, err_msg=name)


def test_afm_trains_and_stores_the_top_1_alone(small_tokenizer_dir, datasets, teacher, tmp_path):  # noqa: F811
    stage_dir = tmp_path / "afm"
    t = tables(small_tokenizer_dir, datasets, str(teacher), objective="afm", weight=0.8)
    t["stage"][0]["token_budget"] = T * ROWS * 2
    t["stage"][0].pop("checkpoint_every_tokens")
    run_stage(request(t, stage_dir, small_tokenizer_dir, datasets))
    [cache] = cache_dirs(stage_dir)
    assert np.load(cache / "00000.ids.npy").shape == (2 * T * ROWS, 1)
    assert {"distill/ce", "distill/kd", "distill/agreement"} <= set(metrics(stage_dir)[0])


@pytest.mark.ray
def test_ray_tasks_compute_the_cache_the_stages_process_computes(cached, small_tokenizer_dir, datasets, teacher,
                                                                 tmp_path):  # noqa: F811  # fmt: skip
    from orchestration.cluster.ray_session import ray_session

    stage_dir, _ = cached
    [cache] = cache_dirs(stage_dir)
    loader = stage_loader(small_tokenizer_dir, datasets, teacher)
    common = {"teacher": str(teacher), "mixture": loader.mixture, "seed": loader.seed, "k": 8, "backend": "torch",
              "device": "cpu"}  # fmt: skip
    jobs = teacher_cache.shard_jobs(loader.mixture, loader.seed, [(T, ROWS)] * STEPS, 3, common)
    assert [len(j["steps"]) for j in jobs] == [2, 2, 2]
    with ray_session(num_cpus=2):
        out = teacher_cache.build_cache(tmp_path / "teacher", "0" * 64, jobs, use_ray=True)
    ours, theirs = teacher_cache.TeacherCache(out), teacher_cache.TeacherCache(cache)
    assert set(ours.entries) == set(theirs.entries)
    for _ in range(STEPS):
        batch = loader.next_batch()
        (a_ids, a_lp), (b_ids, b_lp) = ours(batch), theirs(batch)
        assert np.array_equal(a_ids, b_ids)
        np.testing.assert_allclose(a_lp, b_lp, rtol=0, atol=1e-6)


# ---- the table and the recipe checks -----------------------------------------------------------


def two_stage(tokenizer, datasets: dict, **distill) -> dict:
    """A teacher stage, then a student distilled from it (by name)."""
    t = tables(tokenizer, datasets, "teacher", **distill)
    teacher = {**copy.deepcopy(t["stage"][0]), "name": "teacher", "kind": "pretrain"}
    del teacher["distill"]
    t["stage"] = [teacher, t["stage"][0]]
    return t


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("distill"), r"distill: a 'distill' stage needs \[stage.distill\] with its teacher"),
    (lambda s: s.update(kind="pretrain"), r"distill: \[stage.distill\] is for kinds distill, not 'pretrain'"),
    (lambda s: s["distill"].update(objective="kl"), r"distill.objective must be one of afm, soft, got 'kl'"),
    (lambda s: s["distill"].update(weight=0.5), r"distill.weight is not a setting of objective 'soft'"),
    (lambda s: s["distill"].update(objective="afm"), r"distill.temperature is not a setting of objective 'afm'"),
    (lambda s: s["distill"].update(mix=1.0), r"distill.mix must be in \[0, 1\), got 1.0"),
    (lambda s: s["distill"].update(teacher_run="remote"), r"distill.teacher_run must be one of cached, live"),
    (lambda s: s["distill"].update(top_k=5000), r"distill.top_k \(5,000\) exceeds the vocabulary \(3,000\)"),
    (lambda s: s["distill"].update(teacher="nowhere"), r"distill.teacher: not an earlier stage's name, and .*nowhere"),
])  # fmt: skip
def test_distill_mistakes_are_one_config_error(small_tokenizer_dir, datasets, change, message):  # noqa: F811
    t = two_stage(small_tokenizer_dir, datasets, **SOFT)
    change(t["stage"][1])
    with pytest.raises(ConfigError, match=r"^stage 2 'student': " + message):
        Recipe.from_dict(t)


def test_the_teacher_is_an_earlier_stage_of_the_same_vocabulary(small_tokenizer_dir, datasets, tmp_path):  # noqa: F811
    t = two_stage(small_tokenizer_dir, datasets, **SOFT)
    t["stage"] = t["stage"][::-1]
    t["stage"][0]["start"], t["stage"][1]["start"] = "init", "init"
    with pytest.raises(ConfigError, match=r"^stage 1 'student': distill.teacher: stage 'teacher' comes after this one"):
        Recipe.from_dict(t)
    other = tmp_path / "other"
    BACKEND.save(BACKEND.init(PRESETS["tiny"].replace(vocab_size=500), seed=0), other)
    with pytest.raises(ConfigError, match=r"distill.teacher is a 'lm' model of vocab_size 500; the student is"):
        Recipe.from_dict(tables(small_tokenizer_dir, datasets, str(other), **SOFT))


def test_the_teacher_is_part_of_the_students_identity(small_tokenizer_dir, datasets):  # noqa: F811
    t = two_stage(small_tokenizer_dir, datasets, **SOFT)
    base = Recipe.from_dict(t)
    assert Recipe.from_dict(base.to_dict()) == base and base.stage[1].loss == "soft"
    changed = copy.deepcopy(t)
    changed["stage"][0]["optim"]["lr"] = 1e-3  # the teacher stage changes; the student starts from init
    assert Recipe.from_dict(changed).stage_identities()[1] != base.stage_identities()[1]
    how = copy.deepcopy(t)
    how["stage"][1]["distill"] |= {"teacher_run": "live", "tasks": 2}  # how it runs, not what it computes
    assert Recipe.from_dict(how).stage_identities() == base.stage_identities()


def test_a_relative_teacher_path_resolves_against_the_recipe(small_tokenizer_dir, datasets, teacher):  # noqa: F811
    t = tables(small_tokenizer_dir, datasets, teacher.name, **SOFT)
    recipe = Recipe.from_dict(t, base=teacher.parent)
    assert recipe.stage[0].distill.teacher == str(teacher)


def test_a_teacher_stage_not_yet_run_is_one_error(small_tokenizer_dir, datasets, tmp_path):  # noqa: F811
    t = two_stage(small_tokenizer_dir, datasets, **SOFT)
    req = {**request(t, tmp_path / "stages" / "02-student", small_tokenizer_dir, datasets), "index": 1}
    with pytest.raises(CheckpointError, match=r"^stage 2 'student': its teacher, stage 1 'teacher', has no "
                                              r"checkpoint at .*01-teacher/checkpoint; run that stage first"):  # fmt: skip
        run_stage(req)
