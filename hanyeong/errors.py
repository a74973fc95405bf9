"""The project's error types: one base, narrow subclasses; the CLI prints them as one line."""

# They live in `hanyeong`, the bottom of the dependency graph (tokenizer and orchestration
# import it, it imports neither): every package can raise them without import cycles.


class HanyeongError(Exception):
    """A user-facing failure: the message is the whole story, no traceback needed."""


class ConfigError(HanyeongError):
    """A setting is invalid; the message names it."""


class DataError(HanyeongError):
    """Input data cannot be used (missing, empty, unreadable, wrong format)."""


class CheckpointError(HanyeongError):
    """A checkpoint directory is missing, incomplete, truncated or of another format."""


class TrainingError(HanyeongError):
    """Training cannot go on (a NaN or infinite loss); the message names the stage and step."""
