"""The cluster: Ray sessions (loopback, token auth), the Jobs API client, and the launchers that start
a stage's data-parallel worker group (Ray Train for torch, a placement group + ring for MLX).

May import: `hanyeong`, `orchestration.core`. It runs a stage through a function it is handed or
names (`orchestration.pipeline.stage.run_stage`, imported lazily inside a worker), and reaches a
backend only through the core's protocol. Ray is imported inside functions, never at import time.
"""
