"""The validation hold-out: disjoint, stratified, reproducible."""

import pytest
import torch

from cifar_resnet.data.split import stratified_split


def _labels(counts: list[int]) -> torch.Tensor:
    labels = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]


def test_split_is_disjoint_and_complete() -> None:
    labels = _labels([500] * 10)
    train, val = stratified_split(labels, 1000, seed=0)
    assert len(val) == 1000 and len(train) == 4000
    assert not set(train.tolist()) & set(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(5000))


def test_split_is_stratified() -> None:
    labels = _labels([500] * 10)
    _, val = stratified_split(labels, 1000, seed=0)
    assert torch.bincount(labels[val], minlength=10).tolist() == [100] * 10


def test_split_is_stratified_for_unbalanced_classes() -> None:
    labels = _labels([600, 300, 100])
    _, val = stratified_split(labels, 100, seed=3)
    assert torch.bincount(labels[val]).tolist() == [60, 30, 10]


def test_split_size_is_exact_when_shares_round() -> None:
    labels = _labels([7, 7, 7])
    _, val = stratified_split(labels, 10, seed=0)
    counts = torch.bincount(labels[val], minlength=3)
    assert counts.sum() == 10 and counts.max() - counts.min() <= 1


def test_split_is_reproducible_and_depends_on_seed() -> None:
    labels = _labels([50] * 4)
    first = stratified_split(labels, 40, seed=7)
    again = stratified_split(labels, 40, seed=7)
    other = stratified_split(labels, 40, seed=8)
    assert torch.equal(first[1], again[1]) and torch.equal(first[0], again[0])
    assert not torch.equal(first[1], other[1])


def test_zero_val_size_keeps_everything_for_training() -> None:
    train, val = stratified_split(_labels([5, 5]), 0, seed=0)
    assert len(train) == 10 and len(val) == 0


@pytest.mark.parametrize("size", [-1, 10])
def test_impossible_sizes_are_refused(size: int) -> None:
    with pytest.raises(ValueError, match="val_size"):
        stratified_split(_labels([5, 5]), size, seed=0)


def test_interleaving_takes_the_classes_in_turn_so_every_prefix_covers_them() -> None:
    from cifar_resnet.data.split import interleave_by_class

    labels = torch.tensor([0] * 5 + [1] * 5 + [2] * 4 + [3] * 6)  # sorted by class, as a split comes
    order = interleave_by_class(labels)
    assert sorted(order.tolist()) == list(range(len(labels))), "a permutation"
    shown = labels[order]
    assert shown[:8].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    for prefix in (4, 8, 12):
        assert set(shown[:prefix].tolist()) == {0, 1, 2, 3}
    for cls in range(4):  # within a class the original order is kept
        members = order[shown == cls]
        assert members.tolist() == sorted(members.tolist())
