"""GOLDEN: the loader's data order for a fixed seed, pinned value by value.

Why a golden and not a law: a data cursor (trainer_state.json's `data_cursor`) stores counters only
(documents drawn, each source's epoch and position), and the documents they name come from the
order: the Philox streams keyed by seed and names (`philox`), the source draws (`draw_sources`), each
epoch's permutation (`permutation`) and the held-out documents (`held_documents`). Any change to
them, however lawful (the shares and the conservation laws of test_loader.py still hold), makes an
old cursor resume on other documents, and moves documents between training and validation.

To change the order deliberately: bump CURSOR_VERSION in orchestration/data/loader.py (old cursors
are then refused, not silently replayed wrong), print the new values with the calls below, paste them
here, and say so in the change's notes.
"""

from __future__ import annotations

import numpy as np

from orchestration.data.loader import draw_sources, held_documents, permutation
from tests.orchestration.data.test_loader import BOS, EOS, loader, pieces, rows_of, write_dataset


def test_draws_permutations_and_held_out_documents_are_the_pinned_ones():
    cdf = np.array([0.3, 0.7, 1.0])
    assert draw_sources(5, 0, cdf)[:16].tolist() == [0, 1, 1, 2, 1, 1, 1, 0, 1, 1, 2, 0, 1, 1, 1, 0]
    assert draw_sources(5, 1, cdf)[:16].tolist() == [2, 2, 1, 1, 0, 2, 2, 2, 1, 0, 2, 1, 1, 2, 1, 1]
    assert permutation(5, "d/web", 0, 10).tolist() == [0, 9, 2, 4, 8, 1, 7, 5, 3, 6]
    assert permutation(5, "d/web", 1, 10).tolist() == [4, 6, 2, 8, 0, 1, 5, 9, 3, 7]
    assert held_documents("d/web", 50, 3).tolist() == [0, 7, 18]
    assert held_documents("d/code", 40, 4).tolist() == [14, 17, 20, 31]


def test_a_loaders_first_documents_are_the_pinned_ones(tmp_path):
    """End to end: a two-source mixture holding documents out; document i of source s is
    BOS, tag, EOS with tag 100 * (s + 1) + i, so the stream names each document drawn."""
    write_dataset(tmp_path / "d", {"web": [[BOS, 100 + i, EOS] for i in range(30)],
                                   "code": [[BOS, 200 + i, EOS] for i in range(20)]})  # fmt: skip
    data = loader(tmp_path, {"sources": [{"dataset": "d"}], "hold_out": 2}, seed=7, seq_len=47, rows=1)
    assert {s.key: s.held.tolist() for s in data.sources} == HELD
    stream = rows_of(data.next_batch())[0]
    assert [int(piece[1]) for _, piece in pieces(stream)] == FIRST


HELD = {"d/code": [4, 8], "d/web": [8, 20]}
FIRST = [118, 124, 125, 117, 114, 103, 105, 101, 113, 121, 127, 216, 210, 206, 205, 219]  # tags
