"""The pipeline: recipes, the stage-kind registry, one stage's training loop, the runner that puts
stages on Ray, the run manifest and reports, and the `pipeline` CLI.

May import: `hanyeong`, `tokenizer`, `orchestration.core`, `orchestration.data`,
`orchestration.cluster`; inside a function, `orchestration.eval` (a stage's [stage.eval] scores the
model it trains with eval's tasks). Never a backend package: it asks the core's registry for one by name.
"""
