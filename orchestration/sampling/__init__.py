"""Sampling at scale, the post-training data loop: prompt datasets (prompts.py), generation as a
resumable job over a pool of Ray actors written as Parquet (job.py), reward models' scores of its
answers (score.py), reward functions and verifiers (rewards.py), and rejection sampling with
two-reward-model filtering (select.py).

May import: core and data (the chat template) at module level, eval (load_tokenizer; GSM8K's
number rules) too; cluster (ray_session, a worker's resources) and pipeline (the tokenizer of the
run a checkpoint lies in) inside functions. Nothing imports a framework or Ray at import.
"""
