"""vLLM caches LoRA weights (and prefixes) per int id: two adapters must never share one."""

from __future__ import annotations

import random

from services.student.engine import _lora_int_id


def test_ids_that_share_their_first_hex_digits_get_different_ints():
    # The old id kept 7 hex digits of "a-<16 hex>": these two got the same int.
    first, second = "a-1234567000000000", "a-1234567fffffffff"
    assert _lora_int_id(first) != _lora_int_id(second)
    assert _lora_int_id(first) == _lora_int_id(first) > 0  # stable for the process's lifetime


def test_a_thousand_adapters_get_a_thousand_ints_and_keep_them():
    rng = random.Random(7)
    ids = [f"a-{rng.getrandbits(64):016x}" for _ in range(1000)]
    ints = [_lora_int_id(i) for i in ids]
    assert len(set(ints)) == len(ids) and min(ints) > 0
    assert [_lora_int_id(i) for i in reversed(ids)] == ints[::-1]  # first use decides, forever
