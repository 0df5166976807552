"""Handshake records (dlengine/disagg/records.py): round trip, and clear errors for a record that
does not fit or a region that holds none."""

import pytest
import torch

from dlengine.disagg.records import read_record, write_record


def test_round_trip_and_errors():
    region = torch.full((256,), 7, dtype=torch.uint8)
    write_record(region, {"engine_id": "prefill-1", "role": "prefill", "layout": {"blocks": [1, 2]}})
    assert read_record(region) == {"engine_id": "prefill-1", "role": "prefill", "layout": {"blocks": [1, 2]}}
    assert int(region[-1]) == 0  # the rest of the region is cleared
    with pytest.raises(ValueError, match="does not fit"):
        write_record(torch.zeros(16, dtype=torch.uint8), {"engine_id": "x" * 40})
    with pytest.raises(ValueError, match="record length 0"):
        read_record(torch.zeros(64, dtype=torch.uint8))  # a peer that never wrote one
    bad = torch.zeros(64, dtype=torch.uint8)
    bad[:4] = torch.tensor([3, 0, 0, 0], dtype=torch.uint8)
    bad[4:7] = torch.tensor(list(b"[1]"), dtype=torch.uint8)
    with pytest.raises(ValueError, match="not a JSON object"):
        read_record(bad)
