"""Your own data, end to end: ultrasound DICOM from a scanner (RGB and YBR, with a scan region
and burned-in text), NIfTI pairs as Slicer writes them, a MONAI datalist and a studies folder
labelled through the app each go through prepare -> train -> evaluate -> export-bundle; a DICOM
prediction comes back in the full frame; bad input ends with exit 2 and one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from busi_monai.cli import main
from busi_monai.data.busi import load_case, scan_busi
from busi_monai.data.io import read_image, read_mask
from busi_monai.data.synth import synthesize

DELTA_CM = 0.008  # PhysicalDeltaX/Y of the generated scan regions: 0.08 mm pixels
TOP, LEFT = 14, 8  # where the scan lies in the generated frames
TRAIN = ("--preset", "fast", "--image-size", "32", "--epochs", "1", "--batch-size", "4", "--device", "cpu")


def us_dicom(path: Path, gray: np.ndarray, photometric: str = "RGB", frames: int = 1) -> Path:
    """A US DICOM as a scanner writes one: the scan at (TOP, LEFT) of a larger frame, a text
    band above it and a colour bar beside it, and a Sequence of Ultrasound Regions saying so."""
    from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
    from pydicom.pixel_data_handlers.util import convert_color_space
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    h, w = gray.shape
    H, W = h + TOP + 10, w + LEFT + 12 + (w % 2)  # even width: YBR_FULL_422 pairs pixels
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[TOP : TOP + h, LEFT : LEFT + w] = gray[..., None]
    rgb[2:10, 4 : W - 4] = 255
    rgb[4:8, ::3, 1] = 0  # burned-in text, bright and coloured
    rgb[TOP : TOP + h, W - 6 : W - 2, 0] = np.linspace(0, 255, h)[:, None].astype(np.uint8)  # colour bar
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"  # Ultrasound Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "US"
    ds.Rows, ds.Columns = H, W
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PhotometricInterpretation = photometric
    if photometric == "MONOCHROME2":
        ds.SamplesPerPixel = 1
        frame = rgb[..., 0]
    else:
        ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
        frame = rgb if photometric == "RGB" else convert_color_space(rgb, "RGB", "YBR_FULL")
        if photometric == "YBR_FULL_422":  # Y0 Y1 Cb Cr for each pair of pixels
            ybr = convert_color_space(rgb, "RGB", "YBR_FULL").reshape(H, W // 2, 2, 3).astype(float)
            chroma = ybr[..., 1:].mean(axis=2).round()
            frame = np.concatenate([ybr[..., 0], chroma], axis=-1).astype(np.uint8)
    ds.PixelData = frame.tobytes() * frames
    if frames > 1:
        ds.NumberOfFrames = frames
    r = Dataset()
    r.RegionSpatialFormat, r.RegionDataType, r.RegionFlags = 1, 1, 0
    r.RegionLocationMinX0, r.RegionLocationMinY0 = LEFT, TOP
    r.RegionLocationMaxX1, r.RegionLocationMaxY1 = LEFT + w - 1, TOP + h - 1
    r.PhysicalUnitsXDirection = r.PhysicalUnitsYDirection = 3  # cm
    r.PhysicalDeltaX = r.PhysicalDeltaY = DELTA_CM
    ds.SequenceOfUltrasoundRegions = [r]
    ds.save_as(str(path), write_like_original=False)
    return path


def in_frame(mask: np.ndarray, frame_shape) -> np.ndarray:
    out = np.zeros(frame_shape, np.uint8)
    out[TOP : TOP + mask.shape[0], LEFT : LEFT + mask.shape[1]] = mask
    return out


def write_slicer_nifti(arr: np.ndarray, path: Path, spacing=(0.1, 0.1, 1.0)) -> Path:
    """A 2D array as a single-slice volume of size (W, H, 1), as Slicer saves one."""
    import itk

    vol = itk.image_from_array(np.ascontiguousarray(arr[None]))
    vol.SetSpacing(list(spacing))
    itk.imwrite(vol, str(path))
    return path


def cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """16 small synthetic scans (benign, malignant, normal) with their lesion masks."""
    root = tmp_path_factory.mktemp("synth")
    synthesize(root, 16, seed=3, size_range=(48, 72))
    found, _ = scan_busi(root)
    return [(c.id, c.cls, *load_case(c)) for c in found]


def train_evaluate_export(capsys, data: Path, tmp: Path, evaluate_data: Path | None = None) -> dict:
    """One epoch of training, evaluation on the prepared test split (and on the source as it
    is, if given) and a bundle: each step exits 0 and leaves its files."""
    rc, _, err = cli(capsys, "train", "--data", data, "--out", tmp / "run", *TRAIN)
    assert rc == 0, err
    rc, _, err = cli(capsys, "evaluate", "--model", tmp / "run" / "model.pt", "--data", data, "--out", tmp / "metrics.json", "--device", "cpu")
    assert rc == 0, err
    metrics = json.loads((tmp / "metrics.json").read_text())
    assert metrics["n_images"] == len(json.loads((data / "dataset.json").read_text())["test"]) > 0
    if evaluate_data is not None:
        rc, _, err = cli(capsys, "evaluate", "--model", tmp / "run" / "model.pt", "--data", evaluate_data, "--out", tmp / "direct.json", "--device", "cpu")
        assert rc == 0, err
    rc, _, err = cli(capsys, "export-bundle", "--model", tmp / "run" / "model.pt", "--out", tmp / "bundle", "--metrics", tmp / "metrics.json")
    assert rc == 0, err
    assert (tmp / "bundle" / "models" / "model.ts").is_file() and (tmp / "bundle" / "configs" / "metadata.json").is_file()
    return metrics


def test_dicom_is_read_with_its_scan_region_and_spacing(cases, tmp_path):
    _, _, img, _ = cases[0]
    gray = img.array.astype(np.uint8)
    for photometric in ("RGB", "YBR_FULL", "YBR_FULL_422", "MONOCHROME2"):
        read = read_image(us_dicom(tmp_path / f"{photometric}.dcm", gray, photometric))
        top, left, h, w = read.region
        assert (top, left, h, w) == (TOP, LEFT, *gray.shape)
        assert read.spacing == pytest.approx((DELTA_CM * 10, DELTA_CM * 10))  # cm -> mm
        # The scan's grey values come through each colour model (YBR: to 1 grey level).
        assert np.abs(read.array[top : top + h, left : left + w] - gray).max() <= 1.0, photometric
        assert read.array[2:10].max() > 200  # the text band is in the frame, outside the region
    cine = us_dicom(tmp_path / "cine.dcm", gray, "RGB", frames=3)
    with pytest.raises(ValueError, match=r"cine.dcm: a multi-frame DICOM \(3 frames.*--frame"):
        read_image(cine)
    assert read_image(cine, frame=2).region == (TOP, LEFT, *gray.shape)
    with pytest.raises(ValueError, match="--frame 3 is out of range"):
        read_image(cine, frame=3)


def test_dicom_folder_prepare_train_evaluate_export_and_full_frame_prediction(cases, tmp_path, capsys):
    src = tmp_path / "scanner"
    (src / "images").mkdir(parents=True)
    (src / "labels").mkdir()
    frames = {}
    for k, (cid, _, img, mask) in enumerate(cases):
        dcm = us_dicom(src / "images" / f"{cid}.dcm", img.array.astype(np.uint8), ("RGB", "YBR_FULL_422")[k % 2])
        frames[cid] = read_image(dcm)
        if k < len(cases) - 2:  # the last two stay unlabelled
            Image.fromarray(in_frame(mask, frames[cid].shape) * 255).save(src / "labels" / f"{cid}_mask.png")
    data = tmp_path / "prepared"
    rc, out, err = cli(capsys, "prepare", "--images", src / "images", "--labels", src / "labels", "--out", data, "--test-fraction", "0.3")
    assert rc == 0, err
    dl = json.loads((data / "dataset.json").read_text())
    entries = dl["training"] + dl["test"]
    assert len(entries) == len(cases) - 2 and len(dl["unlabelled"]) == 2 and "label" not in dl["unlabelled"][0]
    assert {e["class"] for e in entries} == {"lesion", "normal"}  # no classes given: lesion / no lesion
    assert {e["class"] for e in dl["test"]} == {"lesion", "normal"}
    for e in entries:
        assert e["source"] == f"{Path(e['image']).name[: -len('.nii.gz')]}.dcm" and e["region"][:2] == [TOP, LEFT]
        # Stored as the scan region only, where it lies in the frame, in mm.
        stored = read_image(data / e["image"])
        assert stored.shape == tuple(e["region"][2:])
        assert stored.spacing == pytest.approx((0.08, 0.08)) and stored.origin == pytest.approx((LEFT * 0.08, TOP * 0.08))
        assert read_mask(data / e["label"]).shape == stored.shape
    summary = json.loads((data / "summary.json").read_text())
    assert summary["source"]["kind"] == "images" and summary["cropped_to_scan_region"] == len(cases)

    train_evaluate_export(capsys, data, tmp_path, evaluate_data=src)
    direct = json.loads((tmp_path / "direct.json").read_text())
    assert direct["n_images"] == len(cases) - 2  # the source as it is: every labelled image

    # A prediction comes back in the full frame: the network saw the scan only, nothing lies outside it.
    from busi_monai.data.preprocessing import preprocess_array
    from busi_monai.inference.predictor import Predictor

    dcm = sorted((src / "images").glob("*.dcm"))[0]
    frame = read_image(dcm)
    top, left, h, w = frame.region
    predictor = Predictor(tmp_path / "run" / "model.pt", device="cpu", confidence_gate=0, postprocess={"min_area_fraction": 0.0})
    predictor.threshold = 0.0  # every scan pixel "lesion": what lies outside can only be the frame
    assert np.array_equal(predictor.preprocess(frame).numpy(), preprocess_array(frame.array[top : top + h, left : left + w], 32).numpy())
    pred = predictor.predict([frame])[0]
    inside = np.zeros(frame.shape, bool)
    inside[top : top + h, left : left + w] = True
    for m in (pred.probability, pred.raw_mask, pred.mask):
        assert m.shape == frame.shape and not m[~inside].any()
    assert pred.raw_mask[inside].all()
    # ... and the CLI writes it in the frame's geometry, in mm, for Slicer.
    rc, out, err = cli(capsys, "infer", "--model", tmp_path / "run" / "model.pt", "--out", tmp_path / "masks", "--device", "cpu", dcm)
    assert rc == 0, err
    written = read_image(out.strip().splitlines()[-1])
    assert written.shape == frame.shape and written.spacing == pytest.approx((0.08, 0.08))
    assert not written.array[~inside].any()

    # The exported bundle, without busi_monai, crops to the region and pastes back the same way.
    from test_bundle import monai_bundle

    bundle = tmp_path / "bundle"
    monai_bundle(
        "run", "--config_file", str(bundle / "configs" / "inference.json"), "--bundle_root", str(bundle),
        "--dataset_dir", str(src / "images"), "--output_dir", str(tmp_path / "bundle_out"), cwd=tmp_path,
    )  # fmt: skip
    rc, out, err = cli(capsys, "infer", "--model", tmp_path / "run" / "model.pt", "--out", tmp_path / "png", "--device", "cpu", "--format", ".png", dcm)
    assert rc == 0, err
    ours, theirs = read_mask(tmp_path / "bundle_out" / f"{dcm.stem}_mask.png"), read_mask(tmp_path / "png" / f"{dcm.stem}_mask.png")
    assert ours.shape == frame.shape and not ours[~inside].any()
    assert (ours == theirs).mean() > 0.99  # float rounding may flip a pixel at the threshold
    monai_bundle(
        "run", "--config_file", str(bundle / "configs" / "inference.json"), "--bundle_root", str(bundle),
        "--dataset_dir", str(src / "images"), "--output_dir", str(tmp_path / "everything"), "--threshold", "1e-12", cwd=tmp_path,
    )  # fmt: skip
    assert np.array_equal(read_mask(tmp_path / "everything" / f"{dcm.stem}_mask.png"), inside)  # all the scan, exactly where it lies


def test_slicer_nifti_pairs_with_a_multi_label_mask(cases, tmp_path, capsys):
    src = tmp_path / "nifti"
    src.mkdir()
    for cid, _, img, mask in cases:
        write_slicer_nifti(img.array.astype(np.uint8), src / f"{cid}.nii.gz")
        seg = mask.astype(np.uint8) * 2
        seg[:4, :4] = 1  # another segment (e.g. a caliper) that is not lesion
        write_slicer_nifti(seg, src / f"{cid}_seg.nii.gz")
    data = tmp_path / "prepared"
    rc, _, err = cli(capsys, "prepare", "--images", src, "--out", data, "--label-value", "2", "--test-fraction", "0.3")
    assert rc == 0, err
    dl = json.loads((data / "dataset.json").read_text())
    assert len(dl["training"]) + len(dl["test"]) == len(cases) and "unlabelled" not in dl
    truth = {cid: mask for cid, _, _, mask in cases}
    for e in dl["training"] + dl["test"]:
        assert np.array_equal(read_mask(data / e["label"]), truth[e["source"][: -len(".nii.gz")]])  # value 2 only
        assert read_image(data / e["image"]).spacing == pytest.approx((0.1, 0.1))
    train_evaluate_export(capsys, data, tmp_path)


def test_datalist_keeps_its_test_list_and_classes(cases, tmp_path, capsys):
    (tmp_path / "scans").mkdir()
    items = []
    for cid, cls, img, mask in cases:
        Image.fromarray(img.array.astype(np.uint8)).save(tmp_path / "scans" / f"{cid}.jpg", quality=95)
        Image.fromarray(mask * 255).save(tmp_path / "scans" / f"{cid}_label.bmp")
        items.append({"image": f"../scans/{cid}.jpg", "label": f"../scans/{cid}_label.bmp", "class": cls})
    test_ids = [cases[i][0] for i in (0, 6, 12)]
    (tmp_path / "lists").mkdir()
    datalist = tmp_path / "lists" / "datalist.json"  # paths relative to the JSON, as MONAI resolves them
    datalist.write_text(json.dumps({"training": [it for it, c in zip(items, cases) if c[0] not in test_ids],
                                    "test": [it for it, c in zip(items, cases) if c[0] in test_ids]}))  # fmt: skip
    data = tmp_path / "prepared"
    rc, _, err = cli(capsys, "prepare", "--datalist", datalist, "--out", data)
    assert rc == 0, err
    dl = json.loads((data / "dataset.json").read_text())
    assert sorted(Path(e["image"]).name.split(".")[0] for e in dl["test"]) == sorted(test_ids)
    assert {e["class"] for e in dl["training"]} == {"benign", "malignant", "normal"}
    assert all(e["source"].startswith("../scans/") for e in dl["training"] + dl["test"])
    train_evaluate_export(capsys, data, tmp_path, evaluate_data=datalist)
    assert json.loads((tmp_path / "direct.json").read_text())["n_images"] == 3  # the datalist's own test list


def test_studies_folder_labelled_through_the_app(cases, tmp_path, capsys, monkeypatch):
    """Labels submitted the way the app's Submit Label stores them (its datastore), a DICOM
    dropped in beside the PNGs, and two images nobody labelled."""
    from app_server import import_app_lib

    import_app_lib(monkeypatch)
    from lib.datastore import BusiDatastore

    from busi_monai.data.studies import DATASTORE_EXTENSIONS

    studies = tmp_path / "studies"
    studies.mkdir()
    shapes = {}
    for k, (cid, _, img, _) in enumerate(cases):
        if k == 0:
            shapes[cid] = read_image(us_dicom(studies / f"{cid}.dcm", img.array.astype(np.uint8))).shape
        else:
            Image.fromarray(img.array.astype(np.uint8)).save(studies / f"{cid}.png")
            shapes[cid] = img.shape
    ds = BusiDatastore(str(studies), extensions=DATASTORE_EXTENSIONS, auto_reload=False)
    assert cases[0][0] in ds.list_images()  # the app lists the DICOM
    for k, (cid, _, _, mask) in enumerate(cases[:-2]):
        label = in_frame(mask, shapes[cid]) if k == 0 else mask
        Image.fromarray(label * 255).save(tmp_path / "submitted.png")
        ds.save_label(cid, str(tmp_path / "submitted.png"), "final", {})
    data = tmp_path / "prepared"
    rc, _, err = cli(capsys, "prepare", "--studies", studies, "--out", data, "--test-fraction", "0.3")
    assert rc == 0, err
    dl = json.loads((data / "dataset.json").read_text())
    assert len(dl["training"]) + len(dl["test"]) == len(cases) - 2 and len(dl["unlabelled"]) == 2
    dicom_entry = next(e for e in dl["training"] + dl["test"] if e["source"].endswith(".dcm"))
    assert dicom_entry["region"][:2] == [TOP, LEFT]
    train_evaluate_export(capsys, data, tmp_path, evaluate_data=studies)

    # The model trained from the studies folder, served back to it by the real app: Run on the
    # DICOM gives a label in its full frame, in mm, empty outside the scan.
    from app_server import AppServer

    from busi_monai.serve import publish_model

    publish_model(tmp_path / "run" / "model.pt", tmp_path / "model")
    with AppServer(studies, tmp_path / "model", workdir=tmp_path / "server", conf={"preset": "fast", "device": "cpu"},
                   env={"MONAI_LABEL_TASKS_SCORING": "false"}) as srv:  # fmt: skip
        result, _ = srv.client(tmp_path / "client").infer("attention_unet", cases[0][0], {"result_extension": ".nii.gz"})
    served = read_image(result)
    assert served.shape == shapes[cases[0][0]] and served.spacing == pytest.approx((0.08, 0.08))
    outside = np.ones(served.shape, bool)
    outside[TOP : TOP + cases[0][2].shape[0], LEFT : LEFT + cases[0][2].shape[1]] = False
    assert not served.array[outside].any()


def _one_line_error(capsys, out: Path, *args) -> str:
    rc, _, err = cli(capsys, "prepare", *args, "--out", out)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert not out.exists()  # nothing written
    return err


def test_bad_input_ends_with_exit_2_one_line_and_nothing_written(cases, tmp_path, capsys):
    _, _, img, mask = cases[0]
    good = tmp_path / "good"
    good.mkdir()
    Image.fromarray(img.array.astype(np.uint8)).save(good / "a.png")
    Image.fromarray(mask * 255).save(good / "a_mask.png")
    bad = tmp_path / "mismatch"
    shutil_copy(good, bad)
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(bad / "b_mask.png")
    Image.fromarray(img.array.astype(np.uint8)).save(bad / "b.png")
    err = _one_line_error(capsys, tmp_path / "out1", "--images", bad)
    assert "b_mask.png" in err and "does not match its image" in err

    broken = tmp_path / "broken"
    shutil_copy(good, broken)
    (broken / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"nonsense" * 20)
    err = _one_line_error(capsys, tmp_path / "out2", "--images", broken)
    assert "c.png" in err

    cine = tmp_path / "cine"
    cine.mkdir()
    us_dicom(cine / "loop.dcm", img.array.astype(np.uint8), frames=2)
    err = _one_line_error(capsys, tmp_path / "out3", "--images", cine)
    assert "loop.dcm" in err and "--frame" in err

    listed = tmp_path / "list.json"
    listed.write_text(json.dumps({"training": [{"image": "missing.png", "label": "missing_mask.png"}]}))
    err = _one_line_error(capsys, tmp_path / "out4", "--datalist", listed)
    assert "missing.png" in err


def shutil_copy(src: Path, dst: Path) -> None:
    import shutil

    shutil.copytree(src, dst)


def test_training_loader_sees_only_the_scan_region(cases, tmp_path):
    """The app trains from its studies folder as it is: a DICOM and its full-frame label reach
    the network as the scan region alone, exactly as the same scan saved on its own would."""
    import torch

    from busi_monai.data.packs import cache_items

    _, _, img, mask = cases[1]
    gray = img.array.astype(np.uint8)
    dcm = us_dicom(tmp_path / "a.dcm", gray, "YBR_FULL_422")
    Image.fromarray(in_frame(mask, read_image(dcm).shape) * 255).save(tmp_path / "a_mask.png")
    Image.fromarray(gray).save(tmp_path / "b.png")
    Image.fromarray(mask * 255).save(tmp_path / "b_mask.png")
    direct = cache_items([{"image": str(dcm), "label": str(tmp_path / "a_mask.png")}], 32, progress=False)
    alone = cache_items([{"image": str(tmp_path / "b.png"), "label": str(tmp_path / "b_mask.png")}], 32, progress=False)
    assert torch.equal(direct.labels, alone.labels) and direct.labels.any()
    assert torch.allclose(direct.images, alone.images, atol=1.5 / 255)  # YBR 4:2:2: within a grey level
