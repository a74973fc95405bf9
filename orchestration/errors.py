"""Error types of the whole project, re-exported from the bottom layer (see tokenizer/errors.py)."""

from tokenizer.errors import CheckpointError, ConfigError, DataError, HanyeongError, TrainingError

__all__ = ["HanyeongError", "ConfigError", "DataError", "CheckpointError", "TrainingError"]
