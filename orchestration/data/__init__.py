"""Data preparation: corpora -> cleaned, filtered, deduplicated, decontaminated, tokenized shards.

`prepare.py` runs the steps in order (ingest, clean, filter, dedup, decontaminate, tokenize) and
records each in the dataset's `manifest.json`; each step lives in its own module.
"""
