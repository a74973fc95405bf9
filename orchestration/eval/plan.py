"""A task's scoring in three parts, so it runs in this process or sharded over Ray tasks the same way:

1. the driver reads the task's file and builds its per-item inputs (prompts, few-shot examples,
   documents, questions) once, so every shard sees what the whole run would;
2. `work` scores a contiguous slice of the inputs with the model: one plain result per input
   (log-likelihoods, a completion, two answers), in order;
3. `finish` turns the per-item results of all inputs, in item order, into the task's result
   (metrics, items, answer files): the same code whether one process or many shards made them.

    plan = plan_task(chosen, config)
    result = plan.run(backend, model, tokenizer, spec, config)      # in this process
    # sharded.py: plan.work on plan.inputs[lo:hi] in each Ray task, then plan.finish(merged)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Plan:
    """What one task scores and how."""

    inputs: list
    """One entry per item, what `work` reads; plain values, since they travel to Ray tasks."""
    work: Callable
    """(backend, model, tokenizer, spec, config, inputs) -> one result per input, in order. A
    module-level function (or a functools.partial of one), so a Ray task can unpickle it."""
    finish: Callable[[list], dict]
    """The results of every input, in item order -> the task's result dict (runs in the driver)."""

    def run(self, backend, model, tokenizer, spec, config) -> dict:
        """The task's result, every input scored in this process."""
        return self.finish(self.work(backend, model, tokenizer, spec, config, self.inputs))
