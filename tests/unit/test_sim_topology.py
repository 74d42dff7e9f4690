"""The simulator's pure helpers: the CPU mask its veths spread flows with."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from nitro_netd.sim.topology import rps_mask


def test_rps_mask_of_a_few_cpus_is_one_hex_group() -> None:
    assert rps_mask(1) == "1"
    assert rps_mask(2) == "3"
    assert rps_mask(32) == "ffffffff"


def test_rps_mask_past_32_cpus_has_padded_groups_most_significant_first() -> None:
    assert rps_mask(33) == "1,ffffffff"
    assert rps_mask(64) == "ffffffff,ffffffff"


@given(st.integers(min_value=1, max_value=4096))
def test_rps_mask_names_exactly_the_first_n_cpus(cpus: int) -> None:
    groups = rps_mask(cpus).split(",")

    assert all(len(group) == 8 for group in groups[1:])
    assert int("".join(groups), 16) == (1 << cpus) - 1
