"""Where images and masks for training and evaluation come from, and the one answer to "is
this a pack, a prepared dataset or a BUSI folder?" (:func:`source_kind`).

* a prepared dataset: a folder with ``dataset.json`` (``busi-monai prepare``), training and
  test splits;
* a pack: one ``.npz`` of images preprocessed to one size (``busi-monai pack``), to carry to a
  GPU machine, with the test split's full-size originals if asked for;
* a BUSI-layout folder (``benign/``, ``malignant/``, ``normal/``): every image, no split;
* your own data as it is (:mod:`busi_monai.data.sources`): a folder of images and masks, a
  Decathlon-style datalist (``.json``) or a MONAI Label studies folder: its labelled images.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from busi_monai.data.packs import CachedData, cache_items, load_pack


class DatasetError(ValueError):
    """Data that cannot be used as asked (not a dataset, wrong size); the message says why."""


def source_kind(data: str | Path) -> str:
    """``"pack"``, ``"prepared"``, ``"busi"`` or one of your own data's sources (``"images"``,
    ``"datalist"``, ``"studies"``); a clear error for anything else."""
    from busi_monai.data.sources import detect_source

    data = Path(data)
    if data.suffix == ".npz":
        if not data.is_file():
            raise DatasetError(f"{data}: no such pack")
        return "pack"
    if (data / "dataset.json").is_file():
        return "prepared"
    if data.is_dir() and any((data / c).is_dir() for c in ("benign", "malignant", "normal")):
        return "busi"
    kind = detect_source(data)
    if kind is not None:
        return kind
    raise DatasetError(
        f"{data}: not a prepared dataset (no dataset.json), a pack (.npz), a BUSI folder, an image folder, "
        "a datalist (.json) or a studies folder; run `busi-monai prepare` first"
    )


def load_datalist(data_dir: str | Path) -> dict[str, list[dict]]:
    """``dataset.json`` of a prepared dataset, with absolute paths."""
    data_dir = Path(data_dir).resolve()
    path = data_dir / "dataset.json"
    if not path.is_file():
        raise DatasetError(f"{data_dir}: not a prepared dataset (no dataset.json); run `busi-monai prepare` first")
    spec = json.loads(path.read_text())
    out = {}
    for split in ("training", "test"):
        items = []
        for it in spec.get(split, []):
            it = dict(it)
            for k in ("image", "label"):
                if k in it and not os.path.isabs(it[k]):
                    it[k] = str(data_dir / it[k])
            it.setdefault("id", Path(it["image"]).name.split(".")[0])
            items.append(it)
        out[split] = items
    return out


def split_items(data: str | Path, split: str | None = "test") -> list[dict]:
    """Image/label items of a prepared dataset's ``split`` (None: both splits), of every image
    of a BUSI folder (its ``label`` is the list of the image's mask files: their union) or of
    your own data as it is (:func:`source_items`)."""
    kind = source_kind(data)
    if kind == "prepared":
        lists = load_datalist(data)
        return lists["training"] + lists["test"] if split is None else lists[split]
    if kind == "busi":
        from busi_monai.data.busi import scan_busi

        cases, _ = scan_busi(data)
        return [{"image": str(c.image), "label": [str(m) for m in c.masks], "class": c.cls, "id": c.id} for c in cases]
    if kind != "pack":
        return source_items(kind, data, split)
    raise DatasetError(f"{data}: a pack holds preprocessed arrays, not files; use load_split")


def source_items(kind: str, data: str | Path, split: str | None = "test") -> list[dict]:
    """The labelled images of your own data as it is (nothing to score an unlabelled one
    against): a datalist's ``test`` list for ``split="test"`` where it has one, else every one."""
    from busi_monai.data.sources import scan_source

    cases, _ = scan_source(kind, data)
    cases = [c for c in cases if c.labels]
    if split == "test" and any(c.split == "test" for c in cases):
        cases = [c for c in cases if c.split == "test"]
    if not cases:
        raise DatasetError(f"{data}: no labelled images to evaluate on")
    return [{"image": str(c.image), "label": [str(p) for p in c.labels], "id": c.id, "source": c.source, **({"class": c.cls} if c.cls else {})} for c in cases]


def load_split(data: str | Path, split: str, image_size: int, progress: bool = True, pad_square: bool = False) -> CachedData:
    """A split preprocessed to ``image_size``: a pack's rows of that split (which must be at
    that size and geometry), or a prepared dataset's or BUSI folder's images decoded once.

    Args:
        data: a pack, a prepared dataset or a BUSI folder (:func:`source_kind`).
        split: ``training`` or ``test``.
        image_size: the network's square side.
        progress: show a progress bar while decoding.
        pad_square: aspect ratio kept by padding to the square, not stretched.
    """
    kind = source_kind(data)
    if kind not in ("pack", "prepared", "busi"):
        # Training needs the near-duplicate groups and the split that only prepare makes.
        raise DatasetError(f"{data}: not a prepared dataset (no dataset.json); prepare your own data first: busi-monai prepare --{kind} {data} --out DATASET")
    if kind == "pack":
        pack = load_pack(data)
        if pack.images.shape[-1] != image_size:
            raise DatasetError(f"{data}: pack is {pack.images.shape[-1]}px, recipe wants {image_size}px")
        if pack.pad_square != pad_square:
            want, has = ("padded to square" if p else "stretched to square" for p in (pad_square, pack.pad_square))
            raise DatasetError(f"{data}: pack images are {has}, recipe wants them {want} (busi-monai pack --pad-square)")
        rows = [i for i, m in enumerate(pack.items) if m.get("split", "training") == split]
        return CachedData(pack.images[rows], pack.labels[rows], [pack.items[i] for i in rows], pack.pad_square)
    return cache_items(split_items(data, split), image_size, progress, pad_square=pad_square)
