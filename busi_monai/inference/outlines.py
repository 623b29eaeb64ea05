"""The last outline each client got for each image, so that a click corrects it.

Slicer's click requests carry all the clicks so far, not the outline on screen. A click
network with the previous-outline channel (``+prev``) corrects an outline, so the server
remembers what it last answered to each (client, image) with the clicks, box and model version
that made it. A request whose clicks *extend* those (each list continues the old one, at least
one click more, same box, same model, same image file) gets that outline back as its previous
outline; anything else (a moved or deleted click, another box, new weights) starts afresh.

Bounded (least recently used first out), thread-safe, in memory only: after a restart each
image starts afresh. Nothing is shared across clients or images.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_CAPACITY = 64

Points = tuple[tuple[float, float], ...]


def _points(points: Sequence[Sequence[float]]) -> Points:
    return tuple((float(p[0]), float(p[1])) for p in points)


@dataclass(frozen=True)
class _Entry:
    foreground: Points
    background: Points
    box: tuple | None
    version: Hashable
    stamp: Hashable  # the image file's identity (e.g. mtime and size): a replaced file starts afresh
    shape: tuple[int, int]
    bits: np.ndarray  # the mask, packed 8 pixels a byte: a 4096x4096 outline holds 2 MiB

    def extended_by(self, fg: Points, bg: Points, box, version, stamp) -> bool:
        return (
            (box, version, stamp) == (self.box, self.version, self.stamp)
            and fg[: len(self.foreground)] == self.foreground
            and bg[: len(self.background)] == self.background
            and len(fg) + len(bg) > len(self.foreground) + len(self.background)
        )


class OutlineCache:
    """``previous(...)`` before a click request, ``remember(...)`` after it. ``capacity`` 0
    remembers nothing (every request starts from the automatic outline)."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        if capacity < 0:
            raise ValueError(f"outline cache capacity {capacity}: must be 0 or more")
        self.capacity = int(capacity)
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def previous(self, client: str, image: str, foreground, background, box=None, version=None, stamp=None) -> np.ndarray | None:
        """The outline last answered to ``client`` for ``image`` when these clicks extend the
        clicks that made it (same box, version and file), as a (H, W) uint8 mask; else None."""
        fg, bg = _points(foreground), _points(background)
        box = None if box is None else tuple(box)
        with self._lock:
            e = self._entries.get((client, image))
            if e is None or not e.extended_by(fg, bg, box, version, stamp):
                return None
            self._entries.move_to_end((client, image))
        h, w = e.shape
        return np.unpackbits(e.bits, count=h * w).reshape(h, w)

    def remember(self, client: str, image: str, foreground, background, box, version, mask: np.ndarray, stamp=None) -> None:
        """``mask`` is what ``client`` was answered for ``image`` with these clicks and box."""
        if self.capacity == 0:
            return
        m = np.asarray(mask) > 0
        entry = _Entry(_points(foreground), _points(background), None if box is None else tuple(box), version, stamp, m.shape, np.packbits(m, axis=None))
        with self._lock:
            self._entries[(client, image)] = entry
            self._entries.move_to_end((client, image))
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
