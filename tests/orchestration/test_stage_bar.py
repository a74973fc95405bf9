"""A stage's progress line shows the time left, from the pace of its own steps."""

from __future__ import annotations

import io
import sys
import time

from orchestration.pipeline.stage_callbacks import StageBar, time_left


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_time_left_is_the_remaining_budget_at_the_steps_pace():
    assert time_left(None, (10.0, 1000), 3000) == "?"
    assert time_left((0.0, 0), (0.0, 0), 3000) == "?"  # one line: no pace yet
    assert time_left((0.0, 0), (10.0, 1000), 3000) == "20s"
    assert time_left((0.0, 0), (10.0, 1000), 10_000) == "1m30s"
    assert time_left((0.0, 0), (1.0, 1), 7201) == "2h00m"


def test_the_bar_ignores_a_resumed_stages_old_lines_and_start_up(monkeypatch):
    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    bar = StageBar("stage 1/2 'general'", 10_000)
    now = time.time()
    bar.show({"tokens": 5000, "loss": 6.0, "time": now - 3600})  # written before this run: no pace
    assert "? left" in str(bar.bar)
    bar.show({"tokens": 6000, "loss": 5.5, "time": now + 10})  # start-up took 10 s: not counted
    bar.show({"tokens": 7000, "loss": 5.0, "time": now + 11})
    line = str(bar.bar)
    bar.close()
    assert "70%" in line and "7.00k/10.0k tokens" in line and "3s left, loss 5.000" in line, line
