"""PinTable (disagg/pin_table.py): the pin bookkeeping the prefill connector and the encoder engine
share. Driven here directly, with a fake clock and a recording `free`, no transport."""

import random

import pytest
import torch

from dlengine.disagg.pin_table import DONE, PIN, PinSlotsFullError, PinTable, ctrl_offset


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(num_slots=4, timeout=10.0, seed=0):
    freed = []
    clock = FakeClock()
    table = PinTable(num_slots, timeout, freed.append, clock=clock, rng=random.Random(seed))
    return table, freed, clock


def test_pin_publishes_nonce_in_pin_row_and_clears_done():
    table, freed, _ = make()
    table.ctrl[DONE, 0] = 1234  # a previous occupant's late done write
    pin = table.pin("a", "held-a")
    assert pin.slot == 0 and pin.nonce > 0 and pin.held == "held-a"
    assert int(table.ctrl[PIN, 0]) == pin.nonce and int(table.ctrl[DONE, 0]) == 0
    assert table.ctrl.shape == (2, 4) and table.ctrl.dtype == torch.int64
    assert len(table) == 1 and table.counts["handed_off"] == 1 and not freed


def test_nonce_is_never_zero():
    class ZeroRng(random.Random):
        def getrandbits(self, k):
            return 0

    table = PinTable(2, 1.0, lambda held: None, rng=ZeroRng())
    assert table.pin("a", None).nonce == 1  # 0 means "not pinned" in the pin row


def test_slot_exhaustion_and_reuse():
    table, freed, _ = make(num_slots=2)
    a = table.pin("a", "A")
    table.pin("b", "B")
    assert not table.has_free_slot
    with pytest.raises(PinSlotsFullError, match="all 2 pin slots"):
        table.pin("c", "C")
    assert table.counts["handed_off"] == 2
    assert table.release_request("a")
    assert table.has_free_slot
    c = table.pin("c", "C")
    assert c.slot == a.slot and c.nonce != a.nonce
    assert freed == ["A"]


def test_done_row_releases_only_on_matching_nonce():
    table, freed, _ = make()
    pin = table.pin("a", "A")
    table.ctrl[DONE, pin.slot] = pin.nonce + 1  # a nonce mismatch: some other request's
    assert table.poll() == [] and len(table) == 1 and not freed
    table.ctrl[DONE, pin.slot] = pin.nonce
    assert table.poll() == [(pin, "done")]
    assert freed == ["A"] and len(table) == 0 and int(table.ctrl[PIN, pin.slot]) == 0
    assert table.counts == {"handed_off": 1, "released_done": 1, "released_timeout": 0, "released_abort": 0}
    assert list(table.events) == [("a", "done")]
    assert table.poll() == []  # released once


def test_stale_done_write_from_previous_occupant_releases_nothing():
    table, freed, _ = make(num_slots=1)
    old = table.pin("old", "OLD")
    assert table.release_request("old")
    new = table.pin("new", "NEW")
    assert new.slot == old.slot
    table.ctrl[DONE, old.slot] = old.nonce  # the old request's puller writes late
    assert table.poll() == [] and freed == ["OLD"]


@pytest.mark.parametrize("n", [3, 12])  # both ways of reading the done row (per slot, whole row)
def test_poll_releases_done_ones_among_many(n):
    table, freed, _ = make(num_slots=16)
    pins = [table.pin(f"r{i}", i) for i in range(n)]
    for p in pins[::2]:
        table.ctrl[DONE, p.slot] = p.nonce
    released = table.poll()
    assert sorted(p.request_id for p, why in released if why == "done") == sorted(p.request_id for p in pins[::2])
    assert sorted(freed) == list(range(0, n, 2)) and len(table) == n - len(pins[::2])


def test_expiry_with_fake_clock():
    table, freed, clock = make(timeout=10.0)
    a = table.pin("a", "A")
    clock.now += 5.0
    b = table.pin("b", "B")
    clock.now += 5.0  # exactly a's deadline: not yet past it
    assert table.poll() == []
    clock.now += 0.001
    assert table.poll() == [(a, "timeout")] and freed == ["A"]
    clock.now += 5.0
    table.ctrl[DONE, b.slot] = b.nonce  # past its deadline too, but done wins
    assert table.poll() == [(b, "done")]
    assert table.counts["released_timeout"] == 1 and table.counts["released_done"] == 1
    assert list(table.events) == [("a", "timeout"), ("b", "done")]


def test_abort_and_release_all():
    table, freed, _ = make()
    table.pin("a", "A")
    table.pin("b", "B")
    table.pin("c", "C")
    assert not table.release_request("nope")
    assert table.release_request("b") and not table.release_request("b")
    table.release_all()
    assert sorted(freed) == ["A", "B", "C"] and len(table) == 0
    assert table.counts["released_abort"] == 3 and not table.ctrl[PIN].any()


def test_pin_entry_is_cleared_before_the_data_is_freed():
    """A pull re-reads the pin entry after its data read: by the time the data can be reused,
    the entry must already say "not pinned"."""
    seen = []
    table = PinTable(4, 10.0, lambda held: seen.append((held, int(table.ctrl[PIN, 1]), table.has_free_slot)))
    table.pin("a", "A")
    table.pin("b", "B")
    table.pin("c", "C")
    table.pin("d", "D")
    assert table.release_request("b")
    # the entry is 0 when `free` runs, and the slot is not yet back in the pool (nothing can re-pin it)
    assert seen == [("B", 0, False)]


def test_ctrl_offset_matches_the_registered_bytes():
    table, _, _ = make(num_slots=5)
    pin = table.pin("a", None)
    table.ctrl[DONE, 3] = 77
    raw = table.ctrl.view(-1).view(torch.uint8)  # what a peer reads with a one-sided op
    at = ctrl_offset(PIN, pin.slot, 5)
    assert int(raw[at:at + 8].view(torch.int64)) == pin.nonce
    at = ctrl_offset(DONE, 3, 5)
    assert int(raw[at:at + 8].view(torch.int64)) == 77


def test_bad_slot_count_is_refused():
    with pytest.raises(ValueError, match="num_slots must be positive"):
        PinTable(0, 1.0, lambda held: None)
