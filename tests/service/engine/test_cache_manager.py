"""Slot ownership: lowest free slot first, usage accounting, misuse refused."""

import pytest

from service.engine.cache_manager import CacheManager


def test_cache_manager_lowest_slot_first():
    cm = CacheManager(3, 10)
    assert [cm.allocate(), cm.allocate(), cm.allocate()] == [0, 1, 2]
    cm.free(1)
    cm.set_tokens(0, 7)
    assert cm.allocate() == 1
    usage = cm.usage()
    assert (usage.slots_used, usage.slots_total, usage.tokens_used, usage.tokens_total) == (3, 3, 7, 30)
    with pytest.raises(RuntimeError):
        cm.allocate()
    with pytest.raises(ValueError):
        cm.free(5)
