"""JSON that every reader can parse: no NaN, no infinity, written atomically.

Python's ``json`` writes ``NaN`` and ``Infinity`` by default, which is not JSON: FastAPI (and
so MONAI Label's ``/info``) refuses to serve it, and other readers fail on it. Everything
busi-monai and its MONAI Label app write or return as JSON goes through :func:`finite`, which
turns a non-finite number into ``null`` (a value that is not defined, such as the Dice of an
empty set, is ``null`` too), and is dumped with ``allow_nan=False`` so nothing slips past.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def finite(obj: Any, where: str = "") -> tuple[Any, list[str]]:
    """A copy of ``obj`` with every non-finite float (NaN, +-inf) replaced by ``None``, and the
    key paths that were replaced (e.g. ``["history[3].loss"]``). Numpy scalars and arrays,
    tuples and other JSON-able containers are converted to plain lists and numbers."""
    replaced: list[str] = []

    def walk(v, path):
        if isinstance(v, bool) or v is None or isinstance(v, (str, int)):
            return v
        if isinstance(v, float):
            if math.isfinite(v):
                return v
            replaced.append(path or "<root>")
            return None
        if isinstance(v, dict):
            return {k: walk(x, f"{path}.{k}" if path else str(k)) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [walk(x, f"{path}[{i}]") for i, x in enumerate(v)]
        tolist = getattr(v, "tolist", None)  # numpy scalars and arrays, torch tensors
        if callable(tolist):
            return walk(tolist(), path)
        return v

    return walk(obj, where), replaced


def dumps(obj: Any, what: str = "JSON", indent: int | None = 2) -> str:
    """``obj`` as strict JSON; non-finite numbers become ``null`` with a warning naming them."""
    clean, replaced = finite(obj)
    if replaced:
        log.warning("%s: non-finite number(s) written as null at %s", what, ", ".join(replaced[:10]))
    return json.dumps(clean, indent=indent, default=str, allow_nan=False)


def loads_strict(text: str) -> Any:
    """Parse JSON, refusing ``NaN``/``Infinity`` (Python's parser accepts them; JSON does not)."""

    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def write_json(obj: Any, path: str | Path) -> None:
    """Write ``obj`` as strict JSON, atomically (readers see the old file or the new one)."""
    from busi_monai.data.io import atomic_path

    text = dumps(obj, what=str(path))
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text + "\n")


def read_json(path: str | Path) -> tuple[Any, list[str]]:
    """Read a JSON file that may hold ``NaN``/``Infinity`` (written by older versions or by
    plain ``json.dump``): the content with those as ``None``, and where they were."""
    with open(path) as f:
        return finite(json.load(f))
