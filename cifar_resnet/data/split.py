"""A stratified, seeded train/validation split.

torch's ``random_split`` is not stratified and scikit-learn is not a dependency, so this is a few lines
of our own: each class gives its share of the validation set, chosen by a seeded generator.
"""

from __future__ import annotations

import torch


def stratified_split(labels: torch.Tensor, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices ``0..len(labels)-1`` into sorted ``(train, val)`` index tensors.

    Each class contributes to ``val`` in proportion to its size (largest remainders settle the rounding),
    so the split is stratified; the same ``labels``, ``val_size`` and ``seed`` always give the same split.
    """
    n = labels.numel()
    if not 0 <= val_size < n:
        raise ValueError(f"val_size must be in [0, {n - 1}] for {n} images, got {val_size}")
    if val_size == 0:
        return torch.arange(n), torch.empty(0, dtype=torch.int64)
    classes, counts = torch.unique(labels, return_counts=True)
    exact = counts.double() * val_size / n
    per_class = exact.floor().long()
    shortfall = val_size - int(per_class.sum())
    if shortfall:
        # Stable order so ties break the same way on every machine.
        order = torch.sort(exact - per_class, descending=True, stable=True).indices
        per_class[order[:shortfall]] += 1
    gen = torch.Generator().manual_seed(seed)
    val_parts = []
    for cls, k in zip(classes.tolist(), per_class.tolist(), strict=True):
        members = torch.nonzero(labels == cls, as_tuple=True)[0]
        val_parts.append(members[torch.randperm(members.numel(), generator=gen)[:k]])
    val = torch.cat(val_parts).sort().values
    is_val = torch.zeros(n, dtype=torch.bool)
    is_val[val] = True
    return torch.nonzero(~is_val, as_tuple=True)[0], val


def interleave_by_class(labels: torch.Tensor) -> torch.Tensor:
    """An order of ``0..len(labels)-1`` that takes the classes in turn: one of each, then the next of each.

    Any prefix of it samples every class alike, so validating on the first batches only (Lightning's
    ``limit_val_batches``) still covers every class. Within a class the original order is kept.
    """
    members = [torch.nonzero(labels == cls, as_tuple=True)[0] for cls in torch.unique(labels).tolist()]
    rank = torch.empty_like(labels, dtype=torch.float64)
    for indices in members:
        # The k-th member of a class goes to round k; within a round classes keep their order.
        rank[indices] = torch.arange(indices.numel(), dtype=torch.float64)
    classes = torch.unique(labels, return_inverse=True)[1].double()
    return torch.argsort(rank * (len(members) + 1) + classes, stable=True)
