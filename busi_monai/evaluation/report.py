"""``busi-monai report``: a one-minute review of a model on a prepared dataset.

Writes ``OUT/report.md`` (and ``OUT/report.html``) with the metrics per class from
:func:`busi_monai.evaluation.evaluate`, the training curves of the run (``history.json``),
the best and the worst cases as figure grids (the paper's Figures 5 and 6: image, truth,
prediction, processed mask, Grad-CAM) and Dice versus lesion size (the paper notes that
small lesions fail). Figures are PNGs beside the report; ``metrics.json`` holds the numbers.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import numpy as np

from busi_monai.data.io import read_image
from busi_monai.explain.explanation import explain_image
from busi_monai.explain.gradcam import DEFAULT_LAYER, resolve_layer
from busi_monai.figures import (
    PRED_COLOUR,
    TRUTH_COLOUR,
    display_image,
    heat_overlay,
    mask_overlay,
    pyplot,
)
from busi_monai.interactive.protocol import plot_dice_vs_clicks

CLASSES = ("benign", "malignant", "normal")
COLUMNS = (
    ("n", "images"),
    ("dice", "Dice"),
    ("iou", "IoU"),
    ("precision", "precision"),
    ("recall", "recall"),
    ("hd95", "HD95 (px)"),
    ("missed", "missed lesions"),
    ("nfp", "normal FP rate"),
    ("acc", "pixel accuracy"),
)


def _fmt(v, digits=3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, (int, str)):
        return str(v)
    return f"{v:.{digits}f}"


def _row(s: dict) -> dict:
    les = s.get("lesion", {})
    n_les = s.get("n_lesion_images", 0)
    return {
        "n": s.get("n_images", 0),
        "dice": les.get("dice") if n_les else None,
        "iou": les.get("iou") if n_les else None,
        "precision": les.get("precision") if n_les else None,
        "recall": les.get("recall") if n_les else None,
        "hd95": les.get("hd95") if n_les else None,
        "missed": f"{s.get('lesion_missed', 0)}/{n_les}" if n_les else "-",
        "nfp": s.get("normal_false_positive_rate"),
        "acc": s.get("pixel_accuracy"),
    }


def metrics_rows(summary: dict) -> list[tuple[str, dict]]:
    per = summary.get("per_class", {})
    rows = [(c, _row(per[c])) for c in CLASSES if c in per]
    rows += [(c, _row(per[c])) for c in per if c not in CLASSES]
    rows.append(("all", _row(summary)))
    return rows


def metrics_table_md(summary: dict) -> str:
    head = "| class | " + " | ".join(t for _, t in COLUMNS) + " |"
    sep = "|---|" + "|".join("---:" for _ in COLUMNS) + "|"
    lines = [head, sep]
    for name, r in metrics_rows(summary):
        cells = [_fmt(r[k], 1 if k == "hd95" else 3) for k, _ in COLUMNS]
        lines.append(f"| {'**all**' if name == 'all' else name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _history_path(model, run) -> Path | None:
    if run is not None:
        p = Path(run)
        return p / "history.json" if p.is_dir() else p
    m = Path(model[0] if isinstance(model, (list, tuple)) else model)
    cand = [m / "history.json"] if m.is_dir() else [m.parent / "history.json"]
    if m.is_dir():
        cand += sorted(m.glob("fold*/history.json"))[:1]
    for c in cand:
        if c.is_file():
            return c
    return None


def training_curves(history: list[dict], path: Path) -> None:
    plt = pyplot()
    ep = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.3))
    axes[0].plot(ep, [h.get("loss") for h in history], "o-", ms=3)
    axes[0].set_title("training loss")
    vd = [h.get("val_dice") for h in history]
    axes[1].plot(ep, [np.nan if v is None else v for v in vd], "o-", ms=3, color="C2", label="val Dice (lesion images)")
    fp = [h.get("val_normal_fp") for h in history]
    if any(v is not None for v in fp):
        axes[1].plot(ep, [np.nan if v is None else v for v in fp], "s--", ms=3, color="C3", label="val normal FP rate")
    score = [h.get("val_score") for h in history]
    if any(v is not None for v in score):
        axes[1].plot(ep, [np.nan if v is None else v for v in score], "-", lw=1, color="0.4", label="val score (selects the model)")
    # Mark the epoch that was kept: the best selection score (runs before it existed: the best Dice).
    chosen = score if any(v is not None for v in score) else vd
    if any(v is not None for v in chosen):
        best = int(np.nanargmax([np.nan if v is None else v for v in chosen]))
        axes[1].axvline(ep[best], color="0.6", lw=0.8, ls=":")
        shown = ("Dice", vd[best]) if vd[best] is not None else ("score", chosen[best])  # no lesion image validated: no Dice
        axes[1].annotate(f"kept: epoch {ep[best]}, {shown[0]} {shown[1]:.3f}", (ep[best], shown[1]), fontsize=8, xytext=(4, -12), textcoords="offset points")
    axes[1].set_ylim(-0.02, 1.02)
    axes[1].set_title("validation")
    axes[1].legend(fontsize=8, loc="lower right")
    axes[2].plot(ep, [h.get("lr") for h in history], "-", color="C1")
    axes[2].set_yscale("log")
    axes[2].set_title("learning rate")
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def gate_plot(result: dict, path: Path) -> None:
    """Held-out lesion Dice, normal false-positive rate and score against the confidence gate."""
    plt = pyplot()
    curve = result["curve"]
    g = [c["gate"] for c in curve]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.plot(g, [c["lesion_dice"] for c in curve], "o-", ms=3, color="C2", label="lesion Dice")
    ax.plot(g, [c["normal_fp"] for c in curve], "s--", ms=3, color="C3", label="normal images with a false lesion")
    ax.plot(g, [c["score"] for c in curve], "-", color="0.3", label="score (selects the gate)")
    ax.axvline(result["chosen"], color="0.6", lw=0.8, ls=":")
    ax.annotate(f"chosen {result['chosen']:.2f}", (result["chosen"], 0.02), fontsize=8, xytext=(4, 0), textcoords="offset points")
    ax.set_xlabel("confidence gate (highest lesion probability an outline needs)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"held-out folds, {result['n_images']} images", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")  # the curves stay below ~0.7
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def case_grid(cases: list, path: Path, title: str) -> None:
    """Rows of (image, truth, prediction, processed, Grad-CAM) like the paper's Figures 5 and 6."""
    plt = pyplot()
    cols = ["image", "ground truth", "prediction (raw)", "processed mask", "Grad-CAM"]
    n = len(cases)
    fig, axes = plt.subplots(n, len(cols), figsize=(len(cols) * 2.5, n * 2.3 + 0.6), squeeze=False)
    for r, e in enumerate(cases):
        img = display_image(e.image)
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.imshow(img, cmap="gray", vmin=0, vmax=1)
                cls = f"{e.label}, " if e.label and e.label not in e.name else ""
                ax.set_ylabel(f"{e.name}\n{cls}Dice {_fmt(e.dice)}", fontsize=8)
            elif c == 1:
                mask_overlay(ax, img, e.truth, TRUTH_COLOUR)
            elif c == 2:
                mask_overlay(ax, img, e.raw_mask, PRED_COLOUR, e.truth)
            elif c == 3:
                mask_overlay(ax, img, e.mask, PRED_COLOUR, e.truth)
            else:
                hm = heat_overlay(ax, img, e.heat, e.mask)
            if r == 0:
                ax.set_title(cols[c], fontsize=9)
            ax.set_aspect("auto")
    fig.suptitle(title + "   (red: prediction, green dashed: truth; Grad-CAM: white = processed mask)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.92, 0.97))
    if n:
        cax = fig.add_axes((0.93, 0.1, 0.012, 0.8))
        fig.colorbar(hm, cax=cax).set_label("Grad-CAM", fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def size_scatter(records: list[dict], path: Path) -> dict:
    """Dice versus lesion size (% of the image), one colour per class."""
    from scipy.stats import spearmanr

    plt = pyplot()
    pts = [r for r in records if r.get("has_lesion") and r.get("dice") is not None and r.get("area_pct")]
    fig, ax = plt.subplots(figsize=(6, 4))
    colours = {"benign": "C0", "malignant": "C3"}
    for cls in sorted({r.get("class") or "?" for r in pts}):
        sub = [r for r in pts if (r.get("class") or "?") == cls]
        ax.scatter([r["area_pct"] for r in sub], [r["dice"] for r in sub], s=18, alpha=0.75, label=f"{cls} (n={len(sub)})", color=colours.get(cls))
    stats = {"n": len(pts)}
    if len(pts) >= 3:
        rho, p = spearmanr([r["area_pct"] for r in pts], [r["dice"] for r in pts])
        stats.update(spearman_rho=float(rho), p_value=float(p))
        ax.text(0.02, 0.97, f"Spearman rho = {rho:.2f} (p = {p:.2g})", transform=ax.transAxes, va="top", fontsize=9)
    ax.set_xscale("log")
    from matplotlib.ticker import FormatStrFormatter

    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(FormatStrFormatter(""))
    ax.set_xlabel("lesion area (% of the image, log scale)")
    ax.set_ylabel("Dice (processed mask)")
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    ax.set_title("Dice versus lesion size")
    if pts:
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return stats


def make_report(
    model,
    data: str | Path,
    out: str | Path,
    run: str | Path | None = None,
    split: str = "test",
    n_cases: int = 4,
    layer: str | None = None,
    device: str = "auto",
    predictor=None,
    progress: bool = False,
    clicks: int = 0,
) -> Path:
    """Evaluate ``model`` on ``data`` and write ``OUT/report.md``, ``report.html`` and PNGs
    (with ``clicks`` and a click-guided model, also Dice against clicks)."""
    from busi_monai.data.datasets import split_items
    from busi_monai.evaluation.evaluate import evaluate, truth_mask
    from busi_monai.inference.predictor import Predictor

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    predictor = predictor or Predictor(model, device=device)
    layer_name = resolve_layer(predictor.network, layer)
    summary = evaluate(model, data, out / "metrics.json", split=split, progress=progress, predictor=predictor, clicks=clicks)
    records = summary["per_image"]
    items = {it["image"]: it for it in split_items(data, split)}

    for r in records:  # lesion size as a fraction of the image (images differ in size)
        if r.get("has_lesion"):
            shape = read_image(r["image"]).shape
            r["area_pct"] = 100.0 * r["lesion_area"] / (shape[0] * shape[1])

    md = ["# Segmentation report\n"]
    model_names = ", ".join(summary.get("model", []))
    md.append(f"Model: `{model_names}` &nbsp; Data: `{data}` (split: {summary.get('split')}, {summary['n_images']} images, "
              f"{summary['n_lesion_images']} with a lesion). Threshold {predictor.threshold:g}; metrics on the processed mask "
              f"at each image's own resolution (lesion metrics over lesion images; the normal false-positive rate is the "
              f"share of lesion-free images with any predicted lesion).\n")
    md.append("## Metrics per class\n")
    md.append(metrics_table_md(summary) + "\n")
    raw = summary.get("raw_mask", {})
    if raw:
        md.append(f"Raw (unprocessed) mask: Dice {_fmt(raw.get('lesion', {}).get('dice'))}, "
                  f"HD95 {_fmt(raw.get('lesion', {}).get('hd95'), 1)} px, normal FP rate {_fmt(raw.get('normal_false_positive_rate'))}.\n")

    figures: list[str] = []
    c = summary.get("clicks")
    if c and c.get("images"):
        md.append("## Dice against clicks\n")
        md.append(
            f"The click protocol on the {c['images']} lesion images: each click at the centre of the largest error "
            f"region (inside a missed region, or on a false one). Dice after 0/1/3/{c['max_clicks']} clicks: "
            + ", ".join(_fmt(c["dice_after"][i]) for i in sorted({0, min(1, c["max_clicks"]), min(3, c["max_clicks"]), c["max_clicks"]}))
            + f"; clicks to reach Dice 0.85: {_fmt(c['noc_85'], 2)}, 0.90: {_fmt(c['noc_90'], 2)}; "
            f"{c['failed_90']} images never reach 0.90.\n"
        )
        plot_dice_vs_clicks(c, out / "dice_vs_clicks.png", title="Lesion Dice against clicks")
        md.append("![Dice against clicks](dice_vs_clicks.png)\n")
    md.append("## Training\n")
    hist_path = _history_path(model, run)
    if hist_path is not None and hist_path.is_file():
        history = json.loads(hist_path.read_text())
        if history:
            training_curves(history, out / "training_curves.png")
            figures.append("training_curves.png")
            vd = [h.get("val_dice") for h in history if h.get("val_dice") is not None]
            md.append(f"{len(history)} epochs from `{hist_path}`; best validation Dice {_fmt(max(vd) if vd else None)}, "
                      f"final training loss {_fmt(history[-1].get('loss'), 4)}.\n")
            md.append("![training curves](training_curves.png)\n")
        else:
            md.append(f"`{hist_path}` is empty.\n")
    else:
        md.append("No `history.json` found (pass `--run RUN`).\n")

    lesion = sorted((r for r in records if r.get("has_lesion") and r.get("dice") is not None), key=lambda r: r["dice"])
    k = min(n_cases, len(lesion) // 2) if len(lesion) >= 2 else len(lesion)
    groups = [("best", "Best cases", lesion[::-1][:k]), ("worst", "Worst cases", lesion[:k])] if k else []
    md.append("## Best and worst cases\n")
    if not groups:
        md.append("No lesion images in this split.\n")
    for key, title, recs in groups:
        cases = []
        for r in recs:
            it = items.get(r["image"], {"image": r["image"], "label": []})
            im = read_image(r["image"])
            truth = truth_mask(it, im.shape) if it.get("label") else None
            cases.append(explain_image(predictor, im, truth, layer_name, name=str(r.get("id") or Path(r["image"]).name), label=r.get("class") or ""))
        fname = f"cases_{key}.png"
        case_grid(cases, out / fname, f"{title} by Dice")
        figures.append(fname)
        md.append(f"**{title}** ({', '.join(f'{c.name} {_fmt(c.dice)}' for c in cases)}); Grad-CAM at `{layer_name}`.\n")
        md.append(f"![{title.lower()}]({fname})\n")
    fps = [r for r in records if not r.get("has_lesion") and r.get("predicted_lesion")]
    if fps:
        md.append(f"Lesion-free images with a false-positive lesion: {', '.join(str(r.get('id')) for r in fps[:10])}"
                  + (" ..." if len(fps) > 10 else "") + ".\n")

    md.append("## Dice versus lesion size\n")
    stats = size_scatter(records, out / "dice_vs_size.png")
    figures.append("dice_vs_size.png")
    if "spearman_rho" in stats:
        small = [r for r in lesion if r["area_pct"] < np.median([x["area_pct"] for x in lesion])]
        large = [r for r in lesion if r not in small]
        md.append(f"Spearman rho {stats['spearman_rho']:.2f} over {stats['n']} lesion images; mean Dice "
                  f"{_fmt(np.mean([r['dice'] for r in small]) if small else None)} below the median size vs "
                  f"{_fmt(np.mean([r['dice'] for r in large]) if large else None)} above.\n")
    md.append("![Dice versus lesion size](dice_vs_size.png)\n")

    text = "\n".join(md)
    (out / "report.md").write_text(text)
    _write_html(text, out / "report.html")
    return out / "report.md"


def _write_html(md: str, path: Path) -> None:
    """A minimal Markdown-to-HTML rendering of the report (headings, tables, images, text)."""
    import re

    body, table = [], []

    def inline(s: str) -> str:
        s = html.escape(s).replace("&amp;nbsp;", "&nbsp;")
        s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
        return re.sub(r"`(.+?)`", r"<code>\1</code>", s)

    def flush():
        if table:
            rows = [r for r in table if not re.fullmatch(r"\|[-:|]+\|", r)]
            cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
            out = ["<table>", "<tr>" + "".join(f"<th>{inline(c)}</th>" for c in cells[0]) + "</tr>"]
            out += ["<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in cells[1:]]
            body.append("\n".join(out + ["</table>"]))
            table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if m := re.match(r"(#+) (.*)", line):
            n = len(m.group(1))
            body.append(f"<h{n}>{inline(m.group(2))}</h{n}>")
        elif m := re.fullmatch(r"!\[(.*)\]\((.*)\)", line):
            body.append(f'<p><img src="{html.escape(m.group(2))}" alt="{html.escape(m.group(1))}" style="max-width:100%"></p>')
        elif line.strip():
            body.append(f"<p>{inline(line)}</p>")
    flush()
    style = "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>busi-monai report</title><style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def cmd_report(a):
    path = make_report(a.model, a.data, a.out, run=a.run, split=a.split, n_cases=a.cases, layer=a.layer, device=a.device, clicks=a.clicks)
    print(path)


def register_cli(sub) -> None:
    s = sub.add_parser("report", help="Markdown/HTML report: metrics per class, training curves, best/worst cases, Dice vs size")
    s.add_argument("--model", required=True, nargs="+")
    s.add_argument("--data", required=True, help="prepared dataset (dataset.json) or a BUSI folder")
    s.add_argument("--out", required=True)
    s.add_argument("--run", default=None, help="run dir with history.json (default: the model's folder)")
    s.add_argument("--split", default="test")
    s.add_argument("--cases", type=int, default=4, help="best and worst cases shown (each)")
    s.add_argument("--layer", default=None, help=f"Grad-CAM layer (default {DEFAULT_LAYER})")
    s.add_argument("--clicks", type=int, default=0, metavar="N", help="click-guided models: Dice against up to N clicks per lesion image")
    s.add_argument("--device", default="auto")
    s.set_defaults(func=cmd_report)
