"""Splitting a wheelhouse into parts that each fit one carry to the GPU machine."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scripts" / "split_wheelhouse.py"
spec = importlib.util.spec_from_file_location("split_wheelhouse", SCRIPT)
split_wheelhouse = importlib.util.module_from_spec(spec)
spec.loader.exec_module(split_wheelhouse)

MIB = 1 << 20


def test_every_wheel_in_one_part_each_part_fits_and_the_last_has_room_for_the_pack():
    # The shape of the real one without ITK: SimpleITK 50 MiB, monailabel 19, many small ones.
    sizes = {"simpleitk.whl": 50 * MIB, "monailabel.whl": 19 * MIB, "cryptography.whl": 5 * MIB, **{f"w{i}.whl": MIB // 2 for i in range(30)}}
    parts = split_wheelhouse.plan(sizes, 60 * MIB, room_last=22 * MIB)
    names = [n for p in parts for n in p]
    assert sorted(names) == sorted(sizes) and len(names) == len(set(names))
    assert all(sum(sizes[n] for n in p) <= 60 * MIB for p in parts)
    assert sum(sizes[n] for n in parts[-1]) + 22 * MIB <= 60 * MIB
    assert "simpleitk.whl" in parts[0]


def test_a_wheel_larger_than_a_part_is_cut_and_joined_back_byte_for_byte(tmp_path):
    import subprocess

    wh = tmp_path / "wheelhouse"
    wh.mkdir()
    big = bytes(range(256)) * 400  # 100 KiB
    (wh / "itk_core-5-py3-none-any.whl").write_bytes(big)
    (wh / "small-1-py3-none-any.whl").write_bytes(b"s" * 1024)
    assert split_wheelhouse.main([str(wh), "--max-mib", str(40 / 1024)]) == 0
    parts = sorted(tmp_path.glob("wheelhouse-*"))
    assert all(sum(f.stat().st_size for f in p.iterdir()) <= 40 * 1024 for p in parts)
    joined = tmp_path / "on-the-machine"
    joined.mkdir()
    for p in parts:  # one call after another
        for f in p.iterdir():
            (joined / f.name).write_bytes(f.read_bytes())
    subprocess.run(["bash", "-c", split_wheelhouse.JOIN], cwd=joined, check=True)
    assert sorted(f.name for f in joined.iterdir()) == sorted(f.name for f in wh.iterdir())
    assert (joined / "itk_core-5-py3-none-any.whl").read_bytes() == big


def test_the_command_writes_the_parts_beside_the_wheelhouse(tmp_path, capsys):
    wh = tmp_path / "wheelhouse"
    wh.mkdir()
    for i, kib in enumerate((40, 30, 20, 10, 5)):
        (wh / f"p{i}-1.0-py3-none-any.whl").write_bytes(b"x" * kib * 1024)
    assert split_wheelhouse.main([str(wh), "--max-mib", str(50 / 1024)]) == 0
    parts = sorted(tmp_path.glob("wheelhouse-*"))
    assert len(parts) >= 2 and sorted(f.name for p in parts for f in p.iterdir()) == sorted(f.name for f in wh.iterdir())
    capsys.readouterr()
    assert split_wheelhouse.main([str(tmp_path / "empty")]) == 2 and "no wheels" in capsys.readouterr().err
