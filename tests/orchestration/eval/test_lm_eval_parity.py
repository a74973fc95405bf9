"""`hanyeong eval` and lm-evaluation-harness agree on the same checkpoint and files: the tiny model
exported with `hanyeong model export-hf`, loaded by lm_eval's HF model, gets the same per-item
log-likelihoods (<= 1e-4) and the same accuracy on KoBEST BoolQ, COPA and a KMMLU slice.

lm_eval runs offline: each task is a YAML in a temporary folder pointing `dataset_path: json` at
the records of the local benchmark files (fields as they are), with lm_eval's own prompts
(lm_eval/tasks/kobest, kmmlu/default) written against those fields."""

from __future__ import annotations

import json

import pytest

from tests.orchestration.eval.conftest import BENCHMARKS, needs_benchmarks

lm_eval = pytest.importorskip("lm_eval")
pytestmark = needs_benchmarks

N = 12  # items per task: 2-4 choices each, seconds on 2 CPUs

UTILS = '''
def boolq_target(doc):
    return int(doc["Answer"].strip() == "True")


def copa_text(doc):  # lm_eval/tasks/kobest/utils.py copa_doc_to_text, on the TSV's fields
    connector = {"원인": " 왜냐하면", "결과": " 그래서"}[doc["question"].strip()]
    return f"""{doc["sentence"]} {connector}"""


def copa_choices(doc):
    return [doc["1"], doc["2"]]


def copa_target(doc):
    return int(doc["Answer"]) - 1
'''

YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
{prompt}
metric_list:
  - metric: acc
  - metric: acc_norm
"""

PROMPTS = {
    # lm_eval/tasks/kobest/kobest_boolq.yaml
    "kobest_boolq": 'doc_to_text: "{{Text}} 질문: {{Question}} 답변: "\n'
                    "doc_to_target: !function utils.boolq_target\n"
                    'doc_to_choice: ["아니오", "예"]',
    "kobest_copa": "doc_to_text: !function utils.copa_text\n"
                   "doc_to_target: !function utils.copa_target\n"
                   "doc_to_choice: !function utils.copa_choices",
    # lm_eval/tasks/kmmlu/default/_default_kmmlu_yaml
    "kmmlu": 'doc_to_text: "{{question.strip()}}\\nA. {{A}}\\nB. {{B}}\\nC. {{C}}\\nD. {{D}}\\n정답："\n'
             'doc_to_choice: ["A", "B", "C", "D"]\n'
             'doc_to_target: "{{answer|int - 1}}"',
}  # fmt: skip


def write_tasks(folder):
    """lm_eval task YAMLs over the first N records of each local file (written as JSON lines)."""
    from orchestration.eval.tasks import TASKS, read_records

    (folder / "utils.py").write_text(UTILS, encoding="utf-8")
    for name, prompt in PROMPTS.items():
        records = read_records(BENCHMARKS / TASKS[name].path)[:N]
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        task = YAML.format(name=f"local_{name}", data=data, prompt=prompt)
        (folder / f"{name}.yaml").write_text(task, encoding="utf-8")


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
    write_tasks(tmp_path)

    theirs = simple_evaluate(
        model="hf", model_args=f"pretrained={hf_dir},dtype=float32", device="cpu", batch_size=8,
        tasks=[f"local_{name}" for name in PROMPTS], task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True,
    )  # fmt: skip
    ours = evaluate(tiny_ckpt, EvalConfig(tasks=",".join(PROMPTS), limit=N, items=True, batch_rows=8),
                    small_tokenizer_dir)  # fmt: skip

    for name in PROMPTS:
        samples = sorted(theirs["samples"][f"local_{name}"], key=lambda s: s["doc_id"])
        their_lls = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
        our_lls = [item["loglikelihoods"] for item in ours["tasks"][name]["items"]]
        assert len(their_lls) == len(our_lls) == N
        pairs = [(a, b) for mine, yours in zip(our_lls, their_lls) for a, b in zip(mine, yours, strict=True)]
        worst = max(abs(a - b) for a, b in pairs)
        assert worst <= 1e-4, f"{name}: log-likelihoods differ by {worst:.2e}"
        metrics = theirs["results"][f"local_{name}"]
        print(f"{name}: {N} items, worst |Δ log-likelihood| {worst:.1e}, lm_eval acc "
              f"{metrics['acc,none']:.4f} acc_norm {metrics['acc_norm,none']:.4f}, ours {ours['tasks'][name]['metrics']}")
        for metric in ("acc", "acc_norm"):
            assert ours["tasks"][name]["metrics"][metric] == pytest.approx(metrics[f"{metric},none"]), (name, metric)
