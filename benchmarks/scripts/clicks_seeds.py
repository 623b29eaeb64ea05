"""Gather the click model's test-split figures over seeds: mean, spread and each seed's.

    python benchmarks/scripts/clicks_seeds.py --out benchmarks/clicks/test-3-seeds \\
        --run own=runs/clicks-s0/test.json,runs/clicks-s1/test.json,runs/clicks-s2/test.json \\
        --run from_best=runs/clicks-s0/test_from_best.json,... \\
        --box runs/clicks-s0/test_box.json,runs/clicks-s1/test_box.json,runs/clicks-s2/test_box.json

Each ``--run NAME=FILES`` is one way of starting the clicks, scored by ``busi-monai evaluate
--clicks N`` once per seed; ``--box`` the ``evaluate --box --clicks 2`` outputs. Writes
``seeds.json`` (per seed and mean / sample standard deviation / range) and ``dice_vs_clicks.png``
(the mean curve of each run) in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from busi_monai.interactive.protocol import plot_dice_vs_clicks
from busi_monai.jsonio import write_json

SHOWN_CLICKS = (0, 1, 2, 3, 5, 10, 20)


def seed_figures(metrics: dict) -> dict:
    """One seed's figures from an ``evaluate --clicks`` output."""
    c = metrics["clicks"]
    d = c["dice_after"]
    return {
        "automatic_lesion_dice": metrics["lesion"]["dice"],
        "automatic_lesion_missed": metrics["lesion_missed"],
        "normal_false_positive_rate": metrics["normal_false_positive_rate"],
        **{f"dice_after_{k}": d[k] for k in SHOWN_CLICKS if k < len(d)},
        "noc_85": c["noc_85"],
        "noc_90": c["noc_90"],
        "failed_90": c["failed_90"],
        "images": c["images"],
        "dice_after": d,
    }


def spread(values: list[float]) -> dict:
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0, "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}


def gather(per_seed: list[dict]) -> dict:
    keys = [k for k in per_seed[0] if k not in ("dice_after", "images")]
    curve = np.mean([s["dice_after"] for s in per_seed], axis=0)
    return {"seeds": per_seed, **{k: spread([s[k] for s in per_seed]) for k in keys}, "mean_dice_after": curve.tolist()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", action="append", required=True, metavar="NAME=FILES", help="a name and its comma-separated evaluate outputs, one per seed")
    p.add_argument("--box", metavar="FILES", help="comma-separated evaluate --box --clicks 2 outputs, one per seed")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"runs": {}}
    curves = {}
    for spec in a.run:
        name, _, files = spec.partition("=")
        if not files:
            p.error(f"--run {spec!r}: expected NAME=FILE,FILE,...")
        per_seed = [seed_figures(json.loads(Path(f).read_text())) for f in files.split(",")]
        g = gather(per_seed)
        result["runs"][name] = {"files": files.split(","), **g}
        curves[name] = {"dice_after": g["mean_dice_after"], "noc_90": g["noc_90"]["mean"], "images": per_seed[0]["images"]}
    if a.box:
        boxes = [json.loads(Path(f).read_text()) for f in a.box.split(",")]
        result["box"] = {
            "files": a.box.split(","),
            "box_alone": spread([b["box"]["dice"] for b in boxes]),
            "box_then_1": spread([b["clicks"]["dice_after"][1] for b in boxes]),
            "box_then_2": spread([b["clicks"]["dice_after"][2] for b in boxes]),
            "jitter_px": boxes[0]["box"]["jitter_px"],
        }
    write_json(result, out / "seeds.json")
    plot_dice_vs_clicks(curves, out / "dice_vs_clicks.png", title="Test split: lesion Dice against clicks, mean over seeds")
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk not in ("seeds", "mean_dice_after", "files")} for k, v in result["runs"].items()}, indent=1))
    if "box" in result:
        print(json.dumps(result["box"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
