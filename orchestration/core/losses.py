"""The loss registry each backend keeps: a name -> the loss function and the batch arrays it reads.

The functions differ between backends (cuda_model/losses.py, mlx_model/losses.py); the bookkeeping
does not, so it is written once here. A loss is `fn(model, batch) -> (summed loss, count)` over a
dict of the backend's arrays; `reads` names the arrays it needs (optional ones, read with
`batch.get`, are left out), checked before a step computes anything.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from hanyeong.errors import ConfigError, DataError

# what to say of a missing array, beyond its name
FIELD_HINTS = {"loss_mask": " (1 on counted targets, e.g. assistant tokens, 0 elsewhere)"}


class LossRegistry:
    """One backend's losses by name."""

    def __init__(self, backend: str):
        self.backend = backend
        self.losses: dict[str, Callable] = {}
        self.reads: dict[str, tuple[str, ...]] = {}

    def register(self, name: str, fn: Callable, reads: tuple[str, ...]) -> None:
        """Make `fn(model, batch) -> (summed loss, count)` the loss `name`, reading the arrays
        `reads`. Replaces a loss of that name."""
        self.losses[name], self.reads[name] = fn, tuple(reads)

    def get(self, name: str) -> Callable:
        """The loss called `name`; an unknown name lists the known ones."""
        try:
            return self.losses[name]
        except KeyError:
            raise ConfigError(f"unknown loss {name!r} for the {self.backend} backend; known: "
                              f"{', '.join(self.losses)}") from None  # fmt: skip

    def check_reads(self, name: str, present: Iterable[str]) -> None:
        """DataError when a batch with arrays `present` lacks one the loss `name` reads."""
        self.get(name)
        present = list(present)
        for array in self.reads[name]:
            if array not in present:
                raise DataError(f"the {name} loss needs batch.{array}{FIELD_HINTS.get(array, '')}; "
                                f"the batch has {', '.join(present)}")  # fmt: skip
