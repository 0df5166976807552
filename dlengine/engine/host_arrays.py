"""Per-request lists -> numpy arrays without a Python loop per request, for the runner's eager
inputs (runner.py) and the CUDA-graph layout (graph_layout.py). Both run on the host every step
for up to hundreds of requests, so a row-by-row numpy assignment (about a microsecond each) is
what these replace.
"""

from __future__ import annotations

from itertools import chain
from typing import Sequence

import numpy as np


def block_table(requests: Sequence) -> np.ndarray:
    """[n, longest block list] int32: row i holds `requests[i].block_ids`, padded with 0."""
    lists = [r.block_ids for r in requests]
    lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
    width = int(lengths.max(initial=0))
    table = np.zeros((len(lists), width), dtype=np.int32)
    # the row-major mask of the filled entries visits them in the order chain() lists them
    filled = np.arange(width) < lengths[:, None]
    table[filled] = np.fromiter(chain.from_iterable(lists), dtype=np.int32, count=int(lengths.sum()))
    return table

