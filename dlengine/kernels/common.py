"""Small helpers several kernel families share, with no Triton and no optional packages: the SM
count the split heuristics size their grids by, and the page-index arrays FlashInfer's planners
take (GQA and MLA alike)."""

from __future__ import annotations

import functools

import numpy as np
import torch

H100_SMS = 132  # what the split heuristics assume off CUDA (only affects how work is split)


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int | None) -> int:
    """Streaming multiprocessors of CUDA device `device_index` (None: not a CUDA device)."""
    if device_index is not None and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device_index).multi_processor_count
    return H100_SMS


def host_indptr(lengths) -> torch.Tensor:
    """[0, l0, l0 + l1, ...] as an int32 host tensor (lengths: a list or numpy array)."""
    indptr = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=indptr[1:])
    return torch.from_numpy(indptr)


def page_indices(seq_lens: torch.Tensor, block_tables: torch.Tensor, page: int, total_pages: int) -> torch.Tensor:
    """The first ceil(seq_lens[i] / page) entries of each block-table row, concatenated ([total]
    int32, on the block tables' device; seq_lens on that device too). Device ops only: no host sync."""
    dev = block_tables.device
    pages = (seq_lens.long() + page - 1) // page  # [B]
    rows = torch.repeat_interleave(torch.arange(pages.numel(), device=dev), pages, output_size=total_pages)
    starts = torch.cumsum(pages, 0) - pages
    cols = torch.arange(total_pages, device=dev) - starts[rows]
    return block_tables[rows, cols].to(torch.int32).contiguous()
