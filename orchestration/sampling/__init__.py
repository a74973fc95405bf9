"""Sampling at scale: prompt datasets (prompts.py) and generation as a resumable job over a pool of
Ray actors, written as a Parquet dataset (job.py). The post-training data loop (rejection sampling,
online preference rounds) reads what it writes. Nothing here imports a framework or Ray at import."""
