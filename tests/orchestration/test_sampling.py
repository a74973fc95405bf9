"""Generation as a job: prompt datasets, per-sample random streams (answers independent of batching,
worker count and a kill), Parquet output, resume, and one clear line per bad input."""

from __future__ import annotations

import gzip
import json
from collections import Counter

import numpy as np
import pytest

from hanyeong.errors import ConfigError, DataError
from orchestration.sampling.prompts import read_prompts


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def test_prompts_of_every_layout(tmp_path):
    records = [
        {"prompt": "Once upon a time"},                                                  # plain
        {"question": "2 + 3?", "answer": "#### 5"},                                       # Q/A: reference kept
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "안녕?"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                      {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]},  # fmt: skip
        {"instruction": "Translate", "input": "고양이"},                                   # no output: a prompt
        {"messages": [{"role": "assistant", "content": "no user"}]},                       # skipped
        {"prompt": "  "},                                                                  # skipped
        {"other": 1},                                                                      # skipped
    ]
    prompts, skipped = read_prompts([write_jsonl(tmp_path / "p.jsonl", records)])
    assert [p.index for p in prompts] == [0, 1, 2, 3, 4]
    assert prompts[0].text == "Once upon a time" and prompts[0].messages is None
    assert prompts[1].messages == ({"role": "user", "content": "2 + 3?"},) and prompts[1].reference == "#### 5"
    assert [m["role"] for m in prompts[2].messages] == ["system", "user"] and prompts[2].reference is None
    assert [m["content"] for m in prompts[3].messages] == ["a", "b", "c"] and prompts[3].reference == "d"
    assert prompts[4].messages == ({"role": "user", "content": "Translate\n\n고양이"},)
    assert skipped == Counter({"no user turn": 1, "empty prompt": 1, "no conversation fields": 1})
    chat, _ = read_prompts([str(tmp_path / "p.jsonl")], chat=True, limit=1)
    assert chat[0].messages == ({"role": "user", "content": "Once upon a time"},) and len(chat) == 1


def test_text_lines_and_gzip(tmp_path):
    (tmp_path / "a.txt").write_text("first\n\nsecond\n", encoding="utf-8")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"prompt": "third"}) + "\n")
    prompts, _ = read_prompts([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl.gz")])
    assert [p.text for p in prompts] == ["first", "second", "third"]


def test_no_prompts_is_one_line(tmp_path):
    with pytest.raises(DataError, match=r"p.jsonl: no prompts \(1 no conversation fields\)$"):
        read_prompts([write_jsonl(tmp_path / "p.jsonl", [{"x": 1}])])


def test_sample_keys_differ_by_every_part():
    from orchestration.core.generation import RowUniforms, sample_key

    keys = {sample_key(s, p, j) for s in range(3) for p in range(3) for j in range(3)}
    assert len(keys) == 27
    a, b = RowUniforms([sample_key(0, 1, 2), sample_key(0, 1, 3)]), RowUniforms([sample_key(0, 1, 2)])
    first = [a.next() for _ in range(3)]
    assert [x[0] for x in first] == [b.next()[0] for _ in range(3)]  # a row's stream ignores its neighbours
    assert all(0 <= u < 1 for x in first for u in x) and first[0][0] != first[0][1]


def test_bad_settings_are_one_line():
    from orchestration.sampling.job import GenerateConfig

    for kwargs, message in [({"n": 0}, "^n must be a positive integer"), ({"top_p": 0}, r"^top_p must be in \(0, 1\]"),
                            ({"temperature": -1}, "^temperature must be 0 or more"), ({"stop": ()}, "^stop: at least one")]:  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            GenerateConfig(**kwargs)


@pytest.fixture(scope="module")
def tiny_model():
    from orchestration.core.backends import get_backend
    from orchestration.core.spec import ModelSpec

    spec = ModelSpec(vocab_size=600, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=96)
    return spec


@pytest.mark.parametrize("name", ["torch", "mlx"])
def test_row_seeded_samples_do_not_depend_on_the_batch(tiny_model, name):
    from orchestration.core.backends import get_backend
    from orchestration.core.generation import sample_key

    if name == "mlx":
        pytest.importorskip("mlx.core")
    backend = get_backend(name)
    model = backend.init(tiny_model, seed=3)
    prompts = [[1, 400, 401, 402], [1, 500], [1, 300, 301, 302, 303, 304, 305], [1, 450, 451]]
    keys = [sample_key(7, i, 0) for i in range(len(prompts))]
    kwargs = {"temperature": 1.0, "top_p": 0.9, "top_k": 50}
    together = backend.generate(model, prompts, 12, row_seeds=keys, **kwargs)
    alone = [backend.generate(model, [p], 12, row_seeds=[k], **kwargs)[0] for p, k in zip(prompts, keys)]
    reordered = backend.generate(model, prompts[::-1], 12, row_seeds=keys[::-1], **kwargs)[::-1]
    assert together == alone == reordered
    other = backend.generate(model, prompts, 12, row_seeds=[sample_key(8, i, 0) for i in range(4)], **kwargs)
    assert other != together  # another seed, other samples
    with pytest.raises(ConfigError, match="2 row_seeds for 4 prompts"):
        backend.generate(model, prompts, 4, row_seeds=keys[:2], **kwargs)


def test_top_k_one_is_greedy(tiny_model):
    from orchestration.core.backends import get_backend
    from orchestration.core.generation import sample_key

    backend = get_backend("torch")
    model = backend.init(tiny_model, seed=3)
    prompts = [[1, 400, 401, 402], [1, 500]]
    greedy = backend.generate(model, prompts, 10)
    assert backend.generate(model, prompts, 10, temperature=1.0, top_k=1,
                            row_seeds=[sample_key(0, i, 0) for i in range(2)]) == greedy  # fmt: skip


# ---- the job ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def job_inputs(tmp_path_factory, small_tokenizer_dir):
    """A tiny model of the small tokenizer's vocabulary and a prompt file of both kinds."""
    from orchestration.core.backends import get_backend
    from orchestration.core.spec import ModelSpec
    from tokenizer.bbpe import BBPETokenizer

    root = tmp_path_factory.mktemp("job")
    vocab = BBPETokenizer.load(small_tokenizer_dir).vocab_size
    spec = ModelSpec(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=128)
    backend = get_backend("torch")
    backend.save(backend.init(spec, seed=1), root / "ckpt")
    records = [{"prompt": f"이야기 {i}: 옛날 옛적에"} for i in range(4)]
    records += [{"question": f"What is {i} + {i}?", "answer": f"#### {2 * i}"} for i in range(4)]
    records += [{"messages": [{"role": "user", "content": "영화 어땠어요?"}]}, {"broken": True}]
    return root / "ckpt", write_jsonl(root / "prompts.jsonl", records), small_tokenizer_dir


def job_rows(out) -> list[dict]:
    import pyarrow.parquet as pq

    table = pq.read_table(out, columns=None).to_pylist() if out.is_file() else None
    rows = table or [r for p in sorted(out.glob("part-*.parquet")) for r in pq.read_table(p).to_pylist()]
    return sorted(rows, key=lambda r: (r["prompt_index"], r["sample"]))


def run_job(job_inputs, out, **kwargs):
    from orchestration.sampling.job import GenerateConfig, generate_dataset

    ckpt, prompts, tokenizer = job_inputs
    settings = {"n": 3, "max_new_tokens": 10, "top_p": 0.95, "prompts_per_part": 4, "batch_rows": 5} | kwargs
    return generate_dataset(ckpt, [prompts], out, GenerateConfig(**settings), tokenizer, progress=False)


def test_a_job_writes_n_answers_per_prompt_with_their_provenance(job_inputs, tmp_path):
    manifest = run_job(job_inputs, tmp_path / "gen")
    rows = job_rows(tmp_path / "gen")
    assert manifest["rows"] == len(rows) == 27 and manifest["prompts_read"] == 9
    assert manifest["skipped"] == {"no conversation fields": 1}
    assert manifest["sampling"]["n"] == 3 and len(manifest["checkpoint_sha256"]) == 64
    assert sorted({r["prompt_index"] for r in rows}) == list(range(9))
    assert [r["sample"] for r in rows[:3]] == [0, 1, 2]
    assert rows[4 * 3]["reference"] == "#### 0" and json.loads(rows[4 * 3]["prompt"])[0]["content"] == "What is 0 + 0?"
    for r in rows:
        assert r["answer_tokens"] == len(r["answer_ids"]) <= 10
        assert r["finish_reason"] == ("stop" if r["answer_tokens"] < 10 else r["finish_reason"])
    assert len({tuple(r["answer_ids"]) for r in rows[:3]}) > 1  # sampled: the three answers differ
    assert sum(manifest["finish_reasons"].values()) == 27


def test_a_reasoning_job_opens_the_thought_and_keeps_its_tags(job_inputs, tmp_path):
    """--reasoning: chat prompts end in EXAONE Deep's generation prompt ([|assistant|]<thought>\\n),
    plain ones stay plain; <thought> and </thought> may be sampled and stay in the answer's text."""
    from orchestration.sampling.job import GenerateConfig, Sampler
    from tokenizer.bbpe import BBPETokenizer

    ckpt, _, tokenizer_dir = job_inputs
    manifest = run_job(job_inputs, tmp_path / "gen", n=1, reasoning=True)
    assert manifest["sampling"]["reasoning"] is True
    assert "reasoning" not in run_job(job_inputs, tmp_path / "plain", n=1)["sampling"]  # older jobs' identity kept
    tok = BBPETokenizer.load(tokenizer_dir)
    thought, end = tok.hf.token_to_id("<thought>"), tok.hf.token_to_id("</thought>")
    for row in job_rows(tmp_path / "gen"):
        opened = tok.decode(row["prompt_ids"][-3:], skip_special_tokens=False).endswith("[|assistant|]<thought>\n")
        assert opened == row["chat"], row["prompt"]
    sampler = Sampler(str(ckpt), "torch", str(tokenizer_dir), GenerateConfig(reasoning=True))
    assert thought not in sampler.suppress and end not in sampler.suppress
    answer = tok.encode("3 + 4 = 7\n") + [end] + tok.encode("\n7") + [tok.hf.token_to_id("[|endofturn|]")]
    assert sampler.text(answer) == "3 + 4 = 7\n</thought>\n7"
    plain = Sampler(str(ckpt), "torch", str(tokenizer_dir), GenerateConfig())
    assert thought in plain.suppress and plain.text(answer) == "3 + 4 = 7\n\n7"


def test_answers_do_not_depend_on_batching_and_a_resumed_job_finishes_the_same(job_inputs, tmp_path):
    first = job_rows(tmp_path / "a") if run_job(job_inputs, tmp_path / "a") else None
    run_job(job_inputs, tmp_path / "b", batch_rows=2)  # other batches: the same answers
    assert job_rows(tmp_path / "b") == first
    # a job killed after its first part: the part files that exist are whole; the rest are made
    (tmp_path / "a" / "part-00001.parquet").unlink()
    (tmp_path / "a" / "manifest.json").unlink()
    run_job(job_inputs, tmp_path / "a")
    assert job_rows(tmp_path / "a") == first


def test_a_folder_of_another_job_is_refused(job_inputs, tmp_path):
    run_job(job_inputs, tmp_path / "gen")
    with pytest.raises(ConfigError, match=r"gen: holds another generation job \(its sampling differ\)"):
        run_job(job_inputs, tmp_path / "gen", seed=1)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(ConfigError, match="other: not empty and not a generation job's folder"):
        run_job(job_inputs, tmp_path / "other")


@pytest.mark.ray
def test_two_ray_workers_give_the_answers_of_one(job_inputs, tmp_path):
    run_job(job_inputs, tmp_path / "one")
    run_job(job_inputs, tmp_path / "two", workers=2)
    assert job_rows(tmp_path / "two") == job_rows(tmp_path / "one")


def test_model_generate_out_command(job_inputs, tmp_path, monkeypatch, capsys):
    from tests.conftest import cli

    ckpt, prompts, tokenizer = job_inputs
    code, out, err = cli(monkeypatch, capsys, "model", "generate", str(ckpt), "--prompts", prompts, "--n", "2",
                         "--out", str(tmp_path / "gen"), "--max-new-tokens", "6", "-t", str(tokenizer))  # fmt: skip
    assert code == 0, err
    assert f"wrote {tmp_path / 'gen'}: 18 answers to 9 prompts" in out and "1 records skipped" in out
    code, out, err = cli(monkeypatch, capsys, "model", "generate", str(ckpt), "--prompt", "x", "--out",
                         str(tmp_path / "g2"), "-t", str(tokenizer))  # fmt: skip
    assert code == 1 and "give --prompts FILE" in err


# ---- scoring and selection --------------------------------------------------------------------


@pytest.fixture(scope="module")
def scored_job(job_inputs, tmp_path_factory):
    """A finished job (9 prompts x 4 answers) and two reward models made from its policy (fresh
    score heads of two seeds), their scores written as rm1 and rm2."""
    from orchestration.core.checkpoint import load_spec, with_score_head
    from orchestration.sampling.score import score_generations

    ckpt, _, _ = job_inputs
    root = tmp_path_factory.mktemp("scored")
    run_job(job_inputs, root / "gen", n=4, max_new_tokens=12)
    spec = load_spec(ckpt).replace(head="score")
    rms = [with_score_head(ckpt, spec, root / f"rm{k}", seed=k) for k in (1, 2)]
    for k, rm in enumerate(rms, 1):
        score_generations(rm, root / "gen", name=f"rm{k}")
    return root / "gen", rms


def test_scores_are_the_reward_models_on_prompt_plus_answer(scored_job):
    from orchestration.core.backends import get_backend
    from orchestration.sampling.score import read_scores

    gen, (rm1, _) = scored_job
    rows, scores = job_rows(gen), read_scores(gen, "rm1")
    assert len(scores) == len(rows) == 36 and len(set(scores.tolist())) > 30
    backend = get_backend("torch")
    model = backend.load(rm1)
    for i in (0, 17, 35):  # one row alone: the batched, length-sorted scores are the same
        ids = np.array([rows[i]["prompt_ids"] + rows[i]["answer_ids"]])
        assert backend.rewards(model, ids, np.array([ids.shape[1]]))[0] == pytest.approx(scores[i], abs=1e-5)


@pytest.mark.ray
def test_scoring_on_two_ray_tasks_gives_the_same_scores(scored_job):
    from orchestration.sampling.score import read_scores, score_generations

    gen, (rm1, _) = scored_job
    score_generations(rm1, gen, name="rm1-ray", workers=2)
    np.testing.assert_allclose(read_scores(gen, "rm1-ray"), read_scores(gen, "rm1"), atol=1e-5)


def test_best_of_n_keeps_the_highest_scored_finished_answer(scored_job, tmp_path):
    from orchestration.sampling.score import read_scores
    from orchestration.sampling.select import SelectConfig, select

    gen, _ = scored_job
    manifest = select(gen, tmp_path / "sft", SelectConfig(by="reward:rm1", finished_only=False))
    assert select(gen, tmp_path / "stop", SelectConfig(by="reward:rm1"))["dropped"].get("no finished answer")
    rows, scores = job_rows(gen), read_scores(gen, "rm1")
    kept = [json.loads(line) for line in (tmp_path / "sft" / "selected.jsonl").read_text().splitlines()]
    assert manifest["kept"] == len(kept) and manifest["kept"] + sum(manifest["dropped"].values()) == 9
    for line in kept:
        p = line["provenance"]
        mine = [(i, r) for i, r in enumerate(rows) if r["prompt_index"] == p["prompt_index"]]
        best = max([(scores[i], r) for i, r in mine], key=lambda x: x[0])
        assert p["samples"] == [best[1]["sample"]] and line["messages"][-1]["content"] == best[1]["answer"]
        assert line["messages"][-1]["role"] == "assistant" and line["messages"][-2]["role"] == "user"
    assert len(kept) == 9 and manifest["policy_sha256"] and manifest["scorers"]["reward:rm1"]["rows"] == 36


def test_two_reward_models_keep_only_what_both_agree_on(scored_job, tmp_path):
    from orchestration.sampling.select import SelectConfig, select

    gen, _ = scored_job
    pairs = {"output": "pairs", "finished_only": False}
    one = select(gen, tmp_path / "one", SelectConfig(by="reward:rm1", **pairs))
    same = select(gen, tmp_path / "same", SelectConfig(by="reward:rm1", second="reward:rm1", **pairs))
    two = select(gen, tmp_path / "two", SelectConfig(by="reward:rm1", second="reward:rm2", **pairs))
    assert same["kept"] == one["kept"] == 9  # a model always agrees with itself
    assert 0 < two["kept"] < 9  # two random heads agree on some pairs, not all
    assert two["kept"] + two["dropped"].get("second model disagrees", 0) == one["kept"]
    for m in (one, same, two):
        assert m["kept"] + sum(m["dropped"].values()) == m["prompts"] == 9
    pairs = [json.loads(line) for line in (tmp_path / "two" / "selected.jsonl").read_text().splitlines()]
    for pair in pairs:
        first, second = pair["provenance"]["scores"]["by"], pair["provenance"]["scores"]["second"]
        assert first[0] > first[1] and second[0] > second[1]


def test_a_verifier_keeps_only_correct_answers(scored_job, tmp_path):
    from orchestration.sampling.rewards import REWARDS, register_reward
    from orchestration.sampling.select import SelectConfig, select

    gen, _ = scored_job
    register_reward("even-length", lambda answer, reference, prompt: float(len(answer) % 2 == 0))
    try:
        manifest = select(gen, tmp_path / "v", SelectConfig(by="verifier:even-length", finished_only=False))
    finally:
        del REWARDS["even-length"]
    kept = [json.loads(line) for line in (tmp_path / "v" / "selected.jsonl").read_text().splitlines()]
    assert kept and all(len(line["messages"][-1]["content"]) % 2 == 0 for line in kept)
    assert manifest["kept"] + manifest["dropped"].get("no correct answer", 0) == 9
    numeric = select(gen, tmp_path / "n", SelectConfig(by="verifier:numeric"))  # a random model: none right
    assert numeric["kept"] + sum(numeric["dropped"].values()) == 9


def test_select_and_score_refuse_bad_inputs_in_one_line(scored_job, job_inputs, tmp_path):
    from orchestration.sampling.score import score_generations
    from orchestration.sampling.select import SelectConfig, select

    gen, _ = scored_job
    with pytest.raises(DataError, match=r"no scores named 'rm9' \(has: rm1, rm1-ray, rm2|no scores named 'rm9' \(has: rm1, rm2"):
        select(gen, tmp_path / "x", SelectConfig(by="reward:rm9"))
    with pytest.raises(ConfigError, match=r"^by must be 'reward:NAME' or 'verifier:NAME'"):
        SelectConfig(by="rm1")
    with pytest.raises(ConfigError, match=r"a language model, not a reward model"):
        score_generations(job_inputs[0], gen)
    with pytest.raises(DataError, match=r"not a generation job's folder"):
        select(tmp_path, tmp_path / "x", SelectConfig(by="reward:rm1"))


def test_greedy_answers_are_transformers_generate_on_the_export(tiny_model, tmp_path):
    """A batch of prompts of different lengths (left padded on both sides), at perturbed weights:
    our greedy ids are transformers' generate's on the exported model."""
    import torch
    from transformers import LlamaForCausalLM

    from orchestration.core.backends import get_backend
    from orchestration.core.export_hf import export_hf

    backend = get_backend("torch")
    model = backend.init(tiny_model, seed=5)
    with torch.no_grad():  # off the initialisation, where attention barely matters
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    backend.save(model, tmp_path / "ckpt")
    hf = LlamaForCausalLM.from_pretrained(export_hf(tmp_path / "ckpt", tmp_path / "hf")).eval()
    prompts = [[1, 400, 401, 402, 403, 404], [1, 500], [1, 300, 301, 302]]
    ours = backend.generate(backend.load(tmp_path / "ckpt"), prompts, 10, suppress_ids=())
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        theirs = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False,
                             pad_token_id=0, eos_token_id=None)[:, width:].tolist()  # fmt: skip
    assert ours == theirs
