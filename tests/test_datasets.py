"""One answer to "is this a pack, a prepared dataset or a BUSI folder?" for training, cross-
validation, evaluation and the benchmark (they had four copies of the question)."""

from __future__ import annotations

import pytest
import torch

from busi_monai.data.datasets import DatasetError, load_split, source_kind, split_items
from busi_monai.data.packs import cache_items, save_pack


def test_each_kind_of_source_is_recognised_and_anything_else_named(prepared_sample, sample_dir, tmp_path):
    assert source_kind(prepared_sample) == "prepared" and source_kind(sample_dir) == "busi"
    items = split_items(prepared_sample, "training")
    save_pack(cache_items(items, 32, progress=False), tmp_path / "p.npz")
    assert source_kind(tmp_path / "p.npz") == "pack"
    with pytest.raises(DatasetError, match="no such pack"):
        source_kind(tmp_path / "missing.npz")
    for bad in (tmp_path, tmp_path / "nothing-here"):
        with pytest.raises(DatasetError, match="not a prepared dataset .* run `busi-monai prepare`"):
            source_kind(bad)


def test_splits_come_out_the_same_from_each_source(prepared_sample, sample_dir, tmp_path):
    train = split_items(prepared_sample, "training")
    both = split_items(prepared_sample, None)
    assert len(both) == len(train) + len(split_items(prepared_sample, "test"))
    busi = split_items(sample_dir, None)
    assert len(busi) == 40 and all(isinstance(it["label"], list) and it["label"] for it in busi)
    assert max(len(it["label"]) for it in busi) > 1  # an image with two mask files keeps both (their union)

    cached = cache_items([dict(it, split="training") for it in train], 32, progress=False)
    save_pack(cached, tmp_path / "p.npz")
    from_pack = load_split(tmp_path / "p.npz", "training", 32)
    from_files = load_split(prepared_sample, "training", 32, progress=False)
    assert len(from_pack) == len(from_files) == len(train)
    assert torch.allclose(from_pack.images, from_files.images, atol=0.5 / 255 + 1e-6) and torch.equal(from_pack.labels, from_files.labels)
    with pytest.raises(DatasetError, match="pack is 32px, recipe wants 64px"):
        load_split(tmp_path / "p.npz", "training", 64)
