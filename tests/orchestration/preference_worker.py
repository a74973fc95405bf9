"""Run in a fresh interpreter by test_preference_laws.py: run_stage on a JSON request, killed (os._exit,
no cleanup) just before optimizer step CRASH_AT + 1, as a lost machine would leave it.

python -m tests.orchestration.preference_worker REQUEST_JSON CRASH_AT
"""

from __future__ import annotations

import json
import os
import sys


def main(request_file: str, crash_at: int) -> None:
    import torch

    from orchestration.core.backends import get_backend
    from orchestration.pipeline.stage import run_stage

    torch.set_num_threads(1)
    request = json.loads(open(request_file, encoding="utf-8").read())
    backend = get_backend(request["backend"])
    real_step = backend.train_step

    def step(state, batch, loss="causal_lm"):
        if state.step == crash_at:
            os._exit(3)
        return real_step(state, batch, loss)

    backend.train_step = step
    run_stage(request)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
