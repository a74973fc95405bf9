"""Evaluation and inference on a checkpoint: benchmark tasks (multiple choice by log-likelihood,
bits per byte), their scoring through the backend protocol, the results files, and the generation
and chat loops of `hanyeong model generate` / `hanyeong chat`.

May import: core (backends, batch, checkpoint), data (the chat template: data/chat.py), pipeline
(the tokenizer of the run a checkpoint lies in: pipeline/run_manifest.py; the local Ray's
resources: pipeline/runner.py) and cluster (ray_session and a worker's resources, for
`hanyeong eval --workers`: sharded.py, inside its functions). It reads checkpoints and runs;
nothing below it imports it (a recipe's own eval would call it from the pipeline's callbacks
through a function-level import).
"""
