"""Split a wheelhouse into folders that each fit one call to the GPU machine (64 MiB carried).

    python benchmarks/scripts/split_wheelhouse.py wheelhouse --max-mib 60 --room-mib 22

A wheel larger than a part (ITK's core wheel is 78 MiB) is cut into ``NAME.partNN`` pieces.
Largest pieces first, each into the first part with room; ``--room-mib`` keeps that much free in
the last part for what travels with it (the data pack). Writes ``<wheelhouse>-1``, ``-2``...
and prints the parts. Copied into one folder on the machine, one call after another while it
stays warm, then joined with :data:`JOIN`, they are the wheelhouse again (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

MIB = 1 << 20
# Run on the machine in the folder the parts were copied into: the cut wheels made whole again.
JOIN = 'for f in *.part00; do [ -e "$f" ] || continue; w="${f%.part00}"; cat "$w".part* > "$w" && rm "$w".part*; done'


def pieces(sizes: dict[str, int], max_bytes: int) -> dict[str, tuple[str, int, int]]:
    """Each wheel, or each piece of one larger than ``max_bytes``: name -> (wheel, offset, size)."""
    out = {}
    for name, size in sizes.items():
        if size <= max_bytes:
            out[name] = (name, 0, size)
            continue
        for k, offset in enumerate(range(0, size, max_bytes)):
            out[f"{name}.part{k:02d}"] = (name, offset, min(max_bytes, size - offset))
    return out


def plan(sizes: dict[str, int], max_bytes: int, room_last: int = 0) -> list[list[str]]:
    """File names per part (``sizes``: what :func:`pieces` gives, each at most ``max_bytes``):
    first-fit by decreasing size; the last part also leaves ``room_last``."""
    parts: list[list[str]] = []
    used: list[int] = []
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        for i, u in enumerate(used):
            if u + sizes[name] <= max_bytes:
                parts[i].append(name)
                used[i] += sizes[name]
                break
        else:
            parts.append([name])
            used.append(sizes[name])
    # The part with the most room goes last, so that the pack travels with it.
    order = sorted(range(len(parts)), key=lambda i: -used[i])
    parts, used = [parts[i] for i in order], [used[i] for i in order]
    if used and used[-1] + room_last > max_bytes:
        # no part has the room: move the smallest wheels of the last part into a new one
        last, moved = sorted(parts[-1], key=lambda n: sizes[n]), []
        while last and sum(sizes[n] for n in last) + room_last > max_bytes:
            moved.append(last.pop())
        parts[-1] = last
        parts.append(moved)
        parts = [p for p in parts if p]
        parts.sort(key=lambda p: -sum(sizes[n] for n in p))
    return [sorted(p) for p in parts]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("wheelhouse")
    p.add_argument("--max-mib", type=float, default=60)
    p.add_argument("--room-mib", type=float, default=0, help="free space to keep in the last part (the pack)")
    a = p.parse_args(argv)
    src = Path(a.wheelhouse)
    wheels = {f.name: f.stat().st_size for f in src.glob("*.whl")}
    if not wheels:
        print(f"split_wheelhouse: no wheels in {src}", file=sys.stderr)
        return 2
    cut = pieces(wheels, int(a.max_mib * MIB))
    parts = plan({n: c[2] for n, c in cut.items()}, int(a.max_mib * MIB), int(a.room_mib * MIB))
    for i, names in enumerate(parts, 1):
        out = src.parent / f"{src.name}-{i}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        for n in names:
            wheel, offset, size = cut[n]
            if n == wheel:
                try:
                    os.link(src / n, out / n)
                except OSError:
                    shutil.copy2(src / n, out / n)
                continue
            with open(src / wheel, "rb") as f:
                f.seek(offset)
                (out / n).write_bytes(f.read(size))
        print(f"{out}: {len(names)} files, {sum(cut[n][2] for n in names) / MIB:.1f} MiB")
    print(f"on the machine, in the folder the parts were copied into: {JOIN}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
