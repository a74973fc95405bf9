"""`hanyeong eval --workers N` on a real local Ray: every task's items scored in Ray tasks give the
results of one process exactly (per-item log-likelihoods, completions, sampled chat answers and the
metrics), and a bad --workers is one line."""

from __future__ import annotations

from dataclasses import replace

import pytest

from orchestration.eval.sharded import cut
from tests.conftest import cli
from tests.orchestration.eval.conftest import needs_benchmarks

GSM8K = [("1 + 1?", "2"), ("2 + 3?", "5"), ("10 - 4?", "6"), ("3 * 3?", "9"), ("8 / 2?", "4")]


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray of 2 CPUs for the module; its workers run torch on one thread."""
    from orchestration.cluster.ray_session import ray_session

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        with ray_session(num_cpus=2) as session:
            yield session


def test_shards_are_contiguous_near_equal_and_never_empty():
    assert cut(5, 2) == [(0, 2), (2, 5)]
    assert cut(2, 4) == [(0, 1), (1, 2)] and cut(0, 3) == []
    for n, parts in ((7, 3), (100, 8), (3, 3)):
        bounds = cut(n, parts)
        assert bounds[0][0] == 0 and bounds[-1][1] == n and all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert max(hi - lo for lo, hi in bounds) - min(hi - lo for lo, hi in bounds) <= 1


@needs_benchmarks
@pytest.mark.ray
def test_sharded_results_equal_one_process(ray_local, tiny_ckpt, small_tokenizer_dir, tmp_path):
    from orchestration.eval.evaluate import EvalConfig, evaluate

    gsm8k = tmp_path / "gsm8k.jsonl"
    gsm8k.write_text("".join(f'{{"question": "{q}", "answer": "{q} = {a}\\n#### {a}"}}\n' for q, a in GSM8K))
    tasks = f"kobest_copa,bpb_ko,gsm8k={gsm8k},mt_bench"
    config = EvalConfig(tasks=tasks, limit=5, items=True, max_new_tokens=4, batch_rows=4, seed=7)
    one = evaluate(tiny_ckpt, config, small_tokenizer_dir)["tasks"]
    sharded = evaluate(tiny_ckpt, replace(config, workers=2), small_tokenizer_dir)["tasks"]
    assert list(sharded) == list(one)
    for name in one:
        assert sharded[name]["shards"] == 2, name  # 5 items: [0, 2) and [2, 5)
        assert sharded[name]["metrics"] == one[name]["metrics"], name
        assert sharded[name].get("items") == one[name].get("items"), name
    assert [len(item["loglikelihoods"]) for item in one["kobest_copa"]["items"]] == [2] * 5
    assert len(one["gsm8k"]["items"]) == 5 and one["bpb_ko"]["metrics"]["bits_per_byte"] > 0
    turns = [[a["choices"][0]["turns"] for a in r["answers"]] for r in (one["mt_bench"], sharded["mt_bench"])]
    assert turns[0] == turns[1]  # writing questions: sampled at 0.7, each from its own seed
    assert {a["generate_params"]["temperature"] for a in one["mt_bench"]["answers"]} == {0.7}


def test_a_bad_worker_count_is_one_line(tiny_ckpt, small_tokenizer_dir, monkeypatch, capsys):
    code, _, err = cli(monkeypatch, capsys, "eval", str(tiny_ckpt), "-t", str(small_tokenizer_dir), "--tasks",
                       "kobest_copa", "--workers", "0")  # fmt: skip
    assert code == 1 and err == "error: workers (--workers) must be at least 1, got 0\n"
