"""Gather the runs of gpu_jobs.sh into one JSON: each run's summary, history, cv and test metrics."""

import json
import sys
from pathlib import Path


def load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def main(runs: str, out: str) -> None:
    runs_dir = Path(runs)
    result = {}
    for d in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        rec = {k: load(d / f"{k}.json") for k in ("summary", "history", "cv")}
        metrics = load(runs_dir / f"{d.name}.metrics.json")
        if metrics:
            metrics.pop("per_image_all", None)
        rec["test"] = metrics
        result[d.name] = {k: v for k, v in rec.items() if v is not None}
    Path(out).write_text(json.dumps(result, indent=1))
    for name, rec in result.items():
        t = rec.get("test") or {}
        lesion = t.get("lesion") or {}
        s = rec.get("summary") or rec.get("cv") or {}
        print(
            f"{name:28s} val_score={s.get('best_val_score', s.get('held_out_score_mean'))} "
            f"test_dice={lesion.get('dice')} normal_fp={t.get('normal_false_positive_rate')} missed={t.get('lesion_missed')} "
            f"time={s.get('train_time_s')}"
        )


if __name__ == "__main__":
    main(*sys.argv[1:])
