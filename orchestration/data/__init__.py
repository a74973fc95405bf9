"""Data: corpora -> cleaned, filtered, deduplicated, decontaminated, tokenized Parquet shards, and
the mixture loader that packs them into training batches.

`prepare.py` runs the steps in order (ingest, clean, filter, dedup, decontaminate, tokenize) and
records each in the dataset's `manifest.json`; each step lives in its own module. `loader.py` reads
prepared datasets back as `Batch`es; `chat.py` / `chat_dataset.py` render conversations. The `data`
CLI sits here too (`cli`).

May import: `hanyeong`, `tokenizer`, `orchestration.core`, and `orchestration.cluster`'s Ray session
(tokenization runs in Ray tasks). Never `orchestration.pipeline` and never a backend package.
"""
