"""`hanyeong eval` and lm-evaluation-harness agree on the same checkpoint and files: the tiny model
exported with `hanyeong model export-hf`, loaded by lm_eval's HF model, gets the same per-item
log-likelihoods (<= 1e-4) and the same accuracy on KoBEST BoolQ, COPA and a KMMLU slice.

lm_eval runs offline on task YAMLs over the local benchmark files, with its own prompts
(orchestration/eval/lm_eval_tasks.py)."""

from __future__ import annotations

import pytest

from orchestration.eval.lm_eval_tasks import PREFIX, PROMPTS, write_tasks
from tests.orchestration.eval.conftest import BENCHMARKS, needs_benchmarks

lm_eval = pytest.importorskip("lm_eval")
pytestmark = needs_benchmarks

N = 12  # items per task: 2-4 choices each, seconds on 2 CPUs


def test_hanyeong_eval_matches_lm_eval(tiny_ckpt, small_tokenizer_dir, tmp_path, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from orchestration.core.export_hf import export_hf
    from orchestration.eval.evaluate import EvalConfig, evaluate

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    hf_dir = tmp_path / "hf"
    export_hf(tiny_ckpt, hf_dir, small_tokenizer_dir)
    names = write_tasks(tmp_path, N, BENCHMARKS)

    theirs = simple_evaluate(
        model="hf", model_args=f"pretrained={hf_dir},dtype=float32", device="cpu", batch_size=8,
        tasks=names, task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True,
    )  # fmt: skip
    ours = evaluate(tiny_ckpt, EvalConfig(tasks=",".join(PROMPTS), limit=N, items=True, batch_rows=8),
                    small_tokenizer_dir)  # fmt: skip

    for name in PROMPTS:
        samples = sorted(theirs["samples"][PREFIX + name], key=lambda s: s["doc_id"])
        their_lls = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
        our_lls = [item["loglikelihoods"] for item in ours["tasks"][name]["items"]]
        assert len(their_lls) == len(our_lls) == N
        pairs = [(a, b) for mine, yours in zip(our_lls, their_lls) for a, b in zip(mine, yours, strict=True)]
        worst = max(abs(a - b) for a, b in pairs)
        assert worst <= 1e-4, f"{name}: log-likelihoods differ by {worst:.2e}"
        metrics = theirs["results"][PREFIX + name]
        print(f"{name}: {N} items, worst |Δ log-likelihood| {worst:.1e}, lm_eval acc "
              f"{metrics['acc,none']:.4f} acc_norm {metrics['acc_norm,none']:.4f}, ours {ours['tasks'][name]['metrics']}")
        for metric in ("acc", "acc_norm"):
            assert ours["tasks"][name]["metrics"][metric] == pytest.approx(metrics[f"{metric},none"]), (name, metric)
