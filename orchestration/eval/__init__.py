"""Evaluation and inference on a checkpoint: benchmark tasks (multiple choice by log-likelihood,
bits per byte), their scoring through the backend protocol, the results files, and the generation
and chat loops of `hanyeong model generate` / `hanyeong chat`.

May import: core (backends, batch, checkpoint), data (the chat template: data/chat.py) and pipeline
(the tokenizer of the run a checkpoint lies in: pipeline/run_manifest.py). It reads checkpoints
and runs; nothing below it imports it (a recipe's own eval would call it from the pipeline's
callbacks through a function-level import).
"""
