"""lm-evaluation-harness task YAMLs over local benchmark files, for comparing `hanyeong eval` with
lm_eval on the same items (tests/orchestration/eval/test_lm_eval_parity.py, benchmarks/eval.py).

    names = write_tasks(folder, limit=12)   # ["local_kobest_boolq", ...]
    simple_evaluate(model="hf", tasks=names, task_manager=TaskManager(include_path=str(folder)), ...)

Each task is a YAML in `folder` pointing `dataset_path: json` at the first `limit` records of the
local file (written as JSON lines, fields as they are), with lm_eval's own prompts
(lm_eval/tasks/kobest, kmmlu/default) written against those fields, so lm_eval runs offline.
Writing the files needs no lm_eval; only reading them does.
"""

from __future__ import annotations

import json
from pathlib import Path

PREFIX = "local_"  # lm_eval's task name: PREFIX + ours (no clash with lm_eval's own kobest_*)

# the YAMLs' `!function utils.NAME`: lm_eval imports utils.py from the task folder
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
"""Our task name -> lm_eval's prompt fields for it: the tasks these YAMLs cover."""


def write_tasks(folder: Path, limit: int, benchmarks: Path | None = None,
                names: tuple[str, ...] = tuple(PROMPTS)) -> list[str]:  # fmt: skip
    """lm_eval task YAMLs (and utils.py) in `folder` over the first `limit` records of each task's
    file under `benchmarks` (None: tasks.benchmarks_dir()); the lm_eval task names, in order."""
    from orchestration.eval.tasks import TASKS, benchmarks_dir, read_records

    root = benchmarks_dir(benchmarks)
    (folder / "utils.py").write_text(UTILS, encoding="utf-8")
    for name in names:
        records = read_records(root / TASKS[name].path)[:limit]
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        task = YAML.format(name=PREFIX + name, data=data, prompt=PROMPTS[name])
        (folder / f"{name}.yaml").write_text(task, encoding="utf-8")
    return [PREFIX + name for name in names]
