"""Messages while progress bars run: each on a line of its own, above the bars."""

from __future__ import annotations

import sys


def note(line: str) -> None:
    """Print `line` on stderr above any live tqdm bar (the bar is cleared, the line printed, the bar
    redrawn below it), never glued onto the bar's line; a plain print when no bar is running."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)
