"""The planner's row de-duplication (circuit_queries.unique_rows) against a plain Python grouping."""

import pytest
import torch

from trifle.planning import circuit_queries
from trifle.planning.circuit_queries import unique_rows


def reference(key: torch.Tensor) -> tuple[list[int], list[int]]:
    """Groups by exact bit pattern, in order of first occurrence."""
    bits = key.view(torch.int64) if key.dtype == torch.float64 else key
    seen: dict[tuple, int] = {}
    first, inverse = [], []
    for i, row in enumerate(map(tuple, bits.tolist())):
        if row not in seen:
            seen[row] = len(first)
            first.append(i)
        inverse.append(seen[row])
    return first, inverse


@pytest.mark.parametrize("dtype", [torch.float64, torch.int64])
def test_groups_equal_rows_in_order_of_first_occurrence(dtype):
    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 3, (40, 6), generator=g).to(dtype)
    key = base[torch.randint(0, 40, (300,), generator=g)]
    first, inverse = unique_rows(key)
    assert (first.tolist(), inverse.tolist()) == reference(key)
    assert torch.equal(key[first][inverse], key)


def test_signed_zeros_stay_apart_and_soft_evidence_values_group_exactly():
    key = torch.tensor([[0.0, 0.25], [-0.0, 0.25], [0.0, 0.25], [0.0, 0.25 + 2**-50]], dtype=torch.float64)
    first, inverse = unique_rows(key)
    assert first.tolist() == [0, 1, 3] and inverse.tolist() == [0, 1, 0, 2]


def test_a_hash_collision_falls_back_to_comparing_rows(monkeypatch):
    monkeypatch.setattr(
        circuit_queries, "_row_hashes", lambda bits: torch.zeros(len(bits), dtype=torch.int64)
    )
    key = torch.tensor([[1, 2], [3, 4], [1, 2], [5, 6], [3, 4]])
    first, inverse = unique_rows(key)
    assert first.tolist() == [0, 1, 3] and inverse.tolist() == [0, 1, 0, 2, 1]
