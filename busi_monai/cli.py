"""The ``busi-monai`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from busi_monai.device import PRECISION_HELP, PRECISIONS
from busi_monai.jsonio import dumps
from busi_monai.training.recipes import PRESETS, Recipe


def _print_json(obj) -> None:
    print(dumps(obj))


def cmd_prepare(a):
    from busi_monai.data.prepare import prepare, prepare_source

    if a.labels is not None and a.images is None:
        raise ValueError("--labels goes with --images")
    if a.busi_root is not None:
        if a.frame is not None or a.label_value is not None:
            raise ValueError("--frame and --label-value are for your own data, not a BUSI folder")
        summary = prepare(a.busi_root, a.out, test_fraction=a.test_fraction, seed=a.seed, progress=sys.stderr.isatty())
    else:
        kind, path = next((k, v) for k, v in (("images", a.images), ("datalist", a.datalist), ("studies", a.studies)) if v is not None)
        summary = prepare_source(
            kind, path, a.out, labels=a.labels, frame=a.frame, label_value=a.label_value,
            test_fraction=a.test_fraction, seed=a.seed, progress=sys.stderr.isatty(),
        )  # fmt: skip
    _print_json({k: v for k, v in summary.items() if k != "problems"})
    for p in summary.get("problems", []):
        print(f"warning: {p}", file=sys.stderr)


def cmd_synth(a):
    from busi_monai.data.synth import synthesize

    _print_json(synthesize(a.out, a.count, seed=a.seed))


def cmd_studies(a):
    from busi_monai.data.studies import make_studies

    _print_json(make_studies(a.busi_root, a.out, with_labels=a.with_labels))


def cmd_pack(a):
    from busi_monai.data.datasets import load_datalist
    from busi_monai.data.io import read_image, read_mask
    from busi_monai.data.packs import cache_items, save_pack

    lists = load_datalist(a.data)
    items = [dict(it, split=s) for s in ("training", "test") for it in lists[s]]
    originals = []
    if a.with_test_originals:
        for it in lists["test"]:
            img = read_image(it["image"])
            originals.append((img.array, read_mask(it["label"], expected_shape=img.shape)))
    save_pack(cache_items(items, a.image_size, pad_square=a.pad_square), a.out, originals)
    print(f"wrote {a.out} ({len(items)} images at {a.image_size}px, {len(originals)} full-size test images)")


def cmd_train(a):
    from busi_monai.training import distributed
    from busi_monai.training.loop import train_dataset

    if a.nproc_per_node > 1 and not distributed.launched():
        from busi_monai.training.launch import run_command, without_option

        # This same command in each worker; under an outer torchrun it is one already.
        run_command(["-m", "busi_monai.cli", *without_option(a.argv, "--nproc-per-node")], a.nproc_per_node)
        return
    with distributed.process_group(a.device, a.collective_timeout or distributed.DEFAULT_TIMEOUT_S) as device:
        main_rank = distributed.current().is_main
        summary = train_dataset(
            a.data, a.out, preset=a.preset, epochs=a.epochs, batch_size=a.batch_size, image_size=a.image_size,
            learning_rate=a.learning_rate, device=device, resume=a.resume, seed=a.seed, compile_model=a.compile,
            overrides=dict(Recipe.parse_override(t) for t in a.set), progress=main_rank,
            amp=PRECISIONS[a.precision], cuda_graphs=a.cuda_graphs,
        )  # fmt: skip
    if main_rank:
        _print_json(summary)


def cmd_evaluate(a):
    from busi_monai.evaluation.evaluate import evaluate
    from busi_monai.inference.predictor import Predictor

    tta = {"auto": None, "on": True, "off": False}[a.tta]
    predictor = Predictor(a.model, device=a.device, tta=tta, confidence_gate=a.confidence_gate)
    automatic = Predictor(a.automatic_model, device=a.device) if a.automatic_model else None
    res = evaluate(
        a.model, a.data, a.out, split=a.split, predictor=predictor, clicks=a.clicks, box=a.box, box_jitter=a.box_jitter, seed=a.seed, automatic=automatic
    )
    if "clicks" in res:
        res["clicks"] = {k: v for k, v in res["clicks"].items() if k != "per_image"}
    _print_json({k: v for k, v in res.items() if k != "per_image"})


def cmd_infer(a):
    from busi_monai.data.io import read_image, write_array, write_mask
    from busi_monai.inference.predictor import Predictor

    pred = Predictor(a.model, device=a.device, confidence_gate=a.confidence_gate)
    out = Path(a.out)
    images = [read_image(p, frame=a.frame) for p in a.images]
    if a.foreground or a.background or a.box:
        if len(images) != 1:
            raise ValueError("--foreground/--background/--box work on one image; give exactly one")
        fg, bg = (_points(v, images[0]) for v in (a.foreground, a.background))
        predictions = [pred.predict_clicks(images[0], fg, bg, box=_box(a.box, images[0]) if a.box else None)]
    else:
        predictions = pred.predict(images)
    for im, p in zip(images, predictions):
        stem = Path(im.path).name
        for ext in (".nii.gz", ".seg.nrrd", ".nrrd", ".png", ".jpg", ".jpeg", ".dcm", ".nii", ".mha"):
            if stem.lower().endswith(ext):
                stem = stem[: -len(ext)]
                break
        ext = a.format if a.format != "same" else _same_format(im.path)
        path = write_mask(p.raw_mask if a.raw else p.mask, out / f"{stem}_mask{ext}", like=im)
        if a.probability:
            write_array(p.probability, out / f"{stem}_prob.nii.gz", like=im)
        print(path)


def _points(texts: list[str], image) -> list[tuple[float, float]]:
    """``X,Y`` pixel positions (X the column, Y the row) inside ``image``, as (row, col)."""
    from busi_monai.interactive.guidance import rowcol_inside

    out = []
    for t in texts:
        try:
            x, y = (float(v) for v in t.split(","))
        except ValueError:
            raise ValueError(f"click {t!r}: expected X,Y (column,row), e.g. 120,84") from None
        try:
            out.append(rowcol_inside(x, y, image.shape))
        except ValueError as e:
            raise ValueError(f"click {t!r} {e}") from None
    return out


def _box(text: str, image) -> tuple[int, int, int, int]:
    """``X0,Y0,X1,Y1`` (columns and rows of two corners, inclusive) as a box on ``image``."""
    from busi_monai.interactive.zoom import box_from_xyxy

    try:
        x0, y0, x1, y1 = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"box {text!r}: expected X0,Y0,X1,Y1 (column,row of two corners), e.g. 40,30,200,150") from None
    try:
        return box_from_xyxy(x0, y0, x1, y1, image.shape)
    except ValueError as e:
        raise ValueError(f"--box {text!r}: {e}") from None


def _same_format(path: str) -> str:
    from busi_monai.data.io import suffix_of

    ext = suffix_of(path)
    return ext if ext in (".png", ".nii.gz", ".nii", ".nrrd", ".mha") else ".nii.gz"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="busi-monai", description="Breast-lesion segmentation in ultrasound (MONAI).")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    presets = list(PRESETS)

    s = sub.add_parser(
        "prepare",
        help="BUSI folder or your own data -> NIfTI dataset, duplicate groups and a leak-free split",
        description="Convert one source of images and masks into a dataset folder (dataset.json, images/, labels/) "
        "for train, cv, evaluate and export-bundle. Near-duplicate images are grouped and kept on one side of the split.",
    )
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--busi-root", metavar="DIR", help="a folder in the BUSI release's layout (benign/, malignant/, normal/)")
    src.add_argument(
        "--images", metavar="DIR",
        help="a folder of images (PNG, JPEG, BMP, TIFF, NIfTI, NRRD, DICOM; sub-folders too); "
        "images without a label are kept as unlabelled",
    )  # fmt: skip
    src.add_argument(
        "--datalist", metavar="FILE.json",
        help="a MONAI Decathlon-style datalist ('training': [{'image', 'label'}], optional 'test' kept as the test split, "
        "optional 'class' per item); paths relative to the JSON's folder",
    )  # fmt: skip
    src.add_argument("--studies", metavar="DIR", help="a MONAI Label studies folder; labels from labels/final")
    s.add_argument(
        "--labels", metavar="DIR",
        help="with --images: the folder of labels, each named after its image's stem, optionally + _mask, _label or _seg "
        "(default: labels with those suffixes beside the images)",
    )  # fmt: skip
    s.add_argument("--out", required=True, metavar="DIR", help="the dataset folder to write; its files are replaced only once every image has been read")
    s.add_argument("--test-fraction", type=float, default=0.2, help="share of the images in the test split (default 0.2; unused when a datalist gives its own test list)")
    s.add_argument("--seed", type=int, default=0, help="seeds the split (default 0)")
    s.add_argument("--frame", type=int, metavar="N", help="the frame (0-based) to take from multi-frame DICOM files (cine loops); without it they are refused")
    s.add_argument("--label-value", type=float, metavar="V", help="the lesion's value in multi-label masks (default: any non-zero value is lesion)")
    s.set_defaults(func=cmd_prepare)

    s = sub.add_parser("synth", help="synthetic B-mode-like images in the BUSI layout")
    s.add_argument("--out", required=True)
    s.add_argument("--count", type=int, default=40)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser("studies", help="lay BUSI (or synthetic, or prepared) data out as a MONAI Label studies folder")
    s.add_argument("--busi-root", required=True, help="BUSI-layout folder or prepared dataset")
    s.add_argument("--out", required=True)
    s.add_argument("--with-labels", action="store_true", help="store the known masks as final labels")
    s.set_defaults(func=cmd_studies)

    s = sub.add_parser("pack", help="a compact 8-bit copy of a prepared dataset at network size (.npz)")
    s.add_argument("--data", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--image-size", type=int, default=256)
    s.add_argument("--with-test-originals", action="store_true", help="also store the test split at full size")
    s.add_argument("--pad-square", action="store_true", help="keep each image's aspect ratio: pad to square (recipe pad_square=true)")
    s.set_defaults(func=cmd_pack)

    s = sub.add_parser("train", help="train a preset on a prepared dataset")
    s.add_argument("--data", required=True, help="prepared dataset dir (dataset.json) or a pack .npz")
    s.add_argument("--preset", choices=presets, default="paper")
    s.add_argument("--out", required=True)
    s.add_argument("--epochs", type=int)
    s.add_argument("--batch-size", type=int)
    s.add_argument("--image-size", type=int)
    s.add_argument("--learning-rate", type=float)
    s.add_argument("--device", default="auto")
    s.add_argument("--resume", action="store_true", help="continue RUN/last.pt")
    s.add_argument("--compile", action="store_true", help="torch.compile the network")
    s.add_argument("--cuda-graphs", action="store_true", help="replay each full batch's step as one CUDA graph: no compile time (adam only; eager on a CPU)")
    s.add_argument("--precision", choices=list(PRECISIONS), default="auto", help=PRECISION_HELP)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a recipe field (ablations), e.g. --set augment=none")
    s.add_argument(
        "--nproc-per-node", type=int, default=1, metavar="N",
        help="train in N workers on this machine (one per GPU; gloo processes on a CPU) through torchrun's launcher; "
        "--batch-size stays the global batch, split over the workers (docs/multi-gpu.md)",
    )  # fmt: skip
    s.add_argument("--collective-timeout", type=float, metavar="S", help="seconds a worker waits for the others before the run fails (default 900)")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("evaluate", help="metrics of a model on a prepared test split or a raw BUSI folder")
    s.add_argument("--model", required=True, nargs="+")
    s.add_argument("--data", required=True, help="a prepared dataset, a pack, a BUSI folder, or your own labelled data as it is: an image folder, a datalist (.json) or a studies folder")
    s.add_argument("--out", default="metrics.json")
    s.add_argument("--split", default="test")
    s.add_argument("--device", default="auto")
    s.add_argument("--tta", choices=("auto", "on", "off"), default="auto", help="test-time flips (auto: as the recipe says)")
    s.add_argument("--confidence-gate", type=float, help="highest lesion probability below which a mask is left empty (0: off; default: the model's)")
    s.add_argument("--clicks", type=int, default=0, metavar="N", help="click-guided models: also the click protocol with up to N clicks per lesion image (Dice after each, NoC@85/90)")
    s.add_argument("--box", action="store_true", help="click-guided models: first a box around each lesion (its bounding box, jittered); reports the box's Dice, and --clicks continue from it")
    s.add_argument("--box-jitter", type=float, default=0.0, metavar="PX", help="pixels each side of the --box may move at random (default 0)")
    s.add_argument("--seed", type=int, default=0, help="seeds the --box jitter")
    s.add_argument("--automatic-model", metavar="PT", help="with --clicks: the clicks correct this model's outline (the automatic one) instead of the click model's own")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("infer", help="lesion masks for images, in each image's own size and geometry")
    s.add_argument("--model", required=True, nargs="+", help="checkpoint(s) or a cross-validation dir")
    s.add_argument("--out", required=True)
    s.add_argument("--device", default="auto")
    s.add_argument("--format", default="same", help="output extension (.png, .nii.gz, .nrrd) or 'same' as input")
    s.add_argument("--raw", action="store_true", help="write the raw thresholded mask, not the processed one")
    s.add_argument("--probability", action="store_true", help="also write the probability map")
    s.add_argument("--frame", type=int, metavar="N", help="the frame (0-based) of multi-frame DICOM files (cine loops); without it they are refused")
    s.add_argument("--confidence-gate", type=float, help="highest lesion probability below which a mask is left empty (0: off; default: the model's)")
    s.add_argument("--foreground", action="append", default=[], metavar="X,Y", help="a click inside the lesion (click-guided models; X the column, Y the row); repeatable")
    s.add_argument("--background", action="append", default=[], metavar="X,Y", help="a click on what is not lesion; repeatable")
    s.add_argument("--box", metavar="X0,Y0,X1,Y1", help="a box around the lesion (click-guided models; columns and rows of two corners): the outline stays inside it")
    s.add_argument("images", nargs="+")
    s.set_defaults(func=cmd_infer)

    _register_optional(sub)
    return p


def _register_optional(sub) -> None:
    """Subcommands that live in their own modules (explain, report, bundle, benchmark, cv, ...)."""
    import importlib

    for mod in ("explain.explanation", "evaluation.report", "bundle.export", "benchmark", "training.crossval", "active.simulation"):
        try:
            m = importlib.import_module(f"busi_monai.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"busi_monai.{mod}":
                raise
            continue
        m.register_cli(sub)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what workers of a launched run are given
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from busi_monai.data.io import BusiInputError
    from busi_monai.model.checkpoint import CheckpointError
    from busi_monai.training.loop import TrainingError

    try:
        args.func(args)
    # OSError: an output folder that cannot be written, a disk that is full; a message, not a traceback.
    except (BusiInputError, CheckpointError, TrainingError, OSError, ValueError) as e:
        if args.verbose:
            raise
        print(f"busi-monai {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"busi-monai {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
