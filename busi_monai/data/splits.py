"""The one grouped, class-stratified splitter: near-duplicate groups never straddle a split, for the test split, the validation slice and the cross-validation folds alike."""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np

from busi_monai.data.busi import Case
from busi_monai.data.packs import CachedData


def group_class(classes: Sequence[str]) -> str:
    """The class a duplicate group is stratified by: ``malignant`` if any member is malignant
    (the rarer, clinically decisive class), else the majority class of the members (ties go
    to ``benign``, i.e. lesion over normal)."""
    classes = list(classes)
    if len(set(classes)) == 1:  # one class (also one the BUSI release does not name, e.g. "lesion")
        return classes[0]
    if "malignant" in classes:
        return "malignant"
    nb, nn = classes.count("benign"), classes.count("normal")
    return "benign" if nb >= nn else "normal"


def grouped_stratified_split(cases: Sequence, groups: Sequence[Sequence[int]], test_fraction: float = 0.2, seed: int = 0):
    """Split case indices into ``(train, test)`` with every group wholly on one side.

    ``cases``: :class:`Case` objects (or class names); ``groups``: index lists covering the
    cases (singletons may be omitted). Each group is stratified by :func:`group_class`; per
    class, groups are shuffled (``seed``) and added to the test side while that brings the
    class's test image count closer to ``round(test_fraction * images of the class)``.
    Returns two sorted index lists.
    """
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    cls_of = [c.cls if isinstance(c, Case) else str(c) for c in cases]
    covered = {k for g in groups for k in g}
    all_groups = [list(g) for g in groups] + [[k] for k in range(len(cases)) if k not in covered]
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[list[int]]] = {}
    for g in all_groups:
        by_class.setdefault(group_class([cls_of[k] for k in g]), []).append(g)
    test: list[int] = []
    for cls in sorted(by_class):
        gs = by_class[cls]
        perm = rng.permutation(len(gs))
        target = round(test_fraction * sum(len(g) for g in gs))
        count = 0
        for p in perm:
            g = gs[p]
            if abs(count + len(g) - target) < abs(count - target):
                test.extend(g)
                count += len(g)
    test_set = set(test)
    return sorted(k for k in range(len(cases)) if k not in test_set), sorted(test_set)


def item_groups(items: list[dict]) -> dict:
    """Item indices by near-duplicate group (an item's ``group``; an item without one is its own)."""
    groups: dict = {}
    for i, it in enumerate(items):
        groups.setdefault(it.get("group", f"i{i}"), []).append(i)
    return groups


def validation_rows(items: list[dict], fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Hold out ``fraction`` of the items for model selection, by
    :func:`grouped_stratified_split` (the splitter of the test split): whole
    near-duplicate groups (``group``) on one side, stratified by ``class`` with a mixed
    group's class decided by :func:`group_class`. At least one item is held
    out, and at least one is kept for training. Returns the (training, validation) indices."""
    everything = list(range(len(items)))
    if fraction <= 0 or len(items) < 2:
        return everything, []
    groups = list(item_groups(items).values())
    _, val_idx = grouped_stratified_split([it.get("class", "?") for it in items], groups, min(fraction, 0.9), seed)
    if not val_idx:  # too few items for the fraction: hold out the smallest group
        val_idx = min(groups, key=len)
    if len(val_idx) == len(items):  # one group holds everything: no validation is possible
        return everything, []
    held = set(val_idx)
    return [i for i in everything if i not in held], [i for i in everything if i in held]


def split_validation(items: list[dict], fraction: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """:func:`validation_rows` as the (training, validation) items themselves."""
    train_idx, val_idx = validation_rows(items, fraction, seed)
    return [items[i] for i in train_idx], [items[i] for i in val_idx]


def split_cached(data: CachedData, fraction: float, seed: int = 0) -> tuple[CachedData, CachedData]:
    """:func:`validation_rows` on images already decoded: the (training, validation) subsets."""
    train_idx, val_idx = validation_rows(data.items, fraction, seed)
    return data.subset(train_idx), data.subset(val_idx)


def split_record(train: list[dict], val: list[dict]) -> dict:
    """What ``RUN/split.json`` holds: the ids and duplicate groups on each side of the split."""
    side = lambda its: [{"id": it.get("id"), "group": it.get("group"), "class": it.get("class")} for it in its]  # noqa: E731
    return {"training": side(train), "validation": side(val)}


def grouped_stratified_folds(items: list[dict], k: int, seed: int = 0) -> list[list[int]]:
    """Fold index lists; whole groups per fold, each class spread evenly (greedy, largest groups
    first). A group counts as the class :func:`group_class` gives it, as in the
    test split: the same in every process (fold processes, a later ``--skip-training``)."""
    rng = random.Random(seed)
    groups = item_groups(items)
    keys = list(groups)
    rng.shuffle(keys)
    keys.sort(key=lambda g: -len(groups[g]))
    folds: list[list[int]] = [[] for _ in range(k)]
    per_class = [dict() for _ in range(k)]
    for g in keys:
        members = groups[g]
        cls = group_class([items[i].get("class", "?") for i in members])
        f = min(range(k), key=lambda j: (per_class[j].get(cls, 0), len(folds[j])))
        folds[f].extend(members)
        per_class[f][cls] = per_class[f].get(cls, 0) + len(members)
    return [sorted(f) for f in folds]
