"""Export a trained model as a MONAI bundle (Model Zoo layout), and read one back.

``busi-monai export-bundle --model run/model.pt --out bundles/busi_attention_unet`` writes::

    busi_attention_unet/
      LICENSE                  Apache-2.0 (code); BUSI research-use note (weights)
      configs/metadata.json    MONAI metadata schema 20240725, network_data_format, eval_metrics
      configs/inference.json   LoadImaged -> ... -> SaveImaged, masks in each image's own size
      configs/train.json       the paper's recipe as a SupervisedTrainer (BCE, Adam 1e-3, x0.95/epoch)
      configs/evaluate.json    merged on train.json: Dice of the processed masks at full size
      configs/logging.conf
      models/model.pt          state_dict
      models/model.ts          TorchScript (traced: the network does not script), with metadata
      scripts/networks.py      copied verbatim from busi_monai/model/networks.py at export
      scripts/dicom.py         copied verbatim from busi_monai/data/dicom.py (ultrasound DICOM, scan region)
      scripts/transforms.py    grayscale + processed-mask transforms (numpy/torch only)
      docs/README.md           usage and measured results (from --metrics, else "not measured")

The bundle needs only MONAI, PyTorch and their readers (pillow, nibabel); the static files live
in ``busi_monai/bundle/template`` and the network source is copied, so there is one definition.
:func:`checkpoint_from_bundle` turns a bundle back into a busi-monai checkpoint dict for
:class:`busi_monai.inference.Predictor` (and the MONAI Label app's ``bundle`` option).
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

import busi_monai.data.dicom as dicom_module
import busi_monai.model.networks as networks_module
from busi_monai import __version__
from busi_monai.jsonio import dumps

TEMPLATE = Path(__file__).with_name("template")
SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
PAPER = (
    "J. Cheng, The Segmentation Model for Breast Cancer Ultrasound Image Based on Attention U-Net "
    "(improved Attention U-Net for breast ultrasound lesion segmentation)."
)
BUSI_PAPER = (
    "W. Al-Dhabyani, M. Gomaa, H. Khaled, A. Fahmy, Dataset of breast ultrasound images, "
    "Data in Brief 28 (2020) 104863. https://doi.org/10.1016/j.dib.2019.104863"
)
BUSI_SOURCE = "https://scholar.cu.edu.eg/?q=afahmy/pages/dataset (Dataset_BUSI_with_GT; Al-Dhabyani et al. 2020)"
CORE_KEYS = ("format", "busi_monai_version", "preset", "network", "recipe", "preprocessing", "threshold", "state_dict")
STATIC_FILES = (
    "LICENSE",
    "configs/inference.json",
    "configs/train.json",
    "configs/evaluate.json",
    "configs/logging.conf",
    "scripts/__init__.py",
    "scripts/transforms.py",
)


# ---------------------------------------------------------------------------------------------
# export


def _bundle_network_config(ckpt: dict) -> dict:
    """The checkpoint's network without deep supervision: the auxiliary heads only act in
    training, so inference is unchanged and the bundle's train.json keeps the paper's BCE."""
    cfg = dict(ckpt["network"])
    cfg["deep_supervision"] = False
    for k, v in cfg.items():
        if isinstance(v, tuple):
            cfg[k] = list(v)
    return cfg


def _bundle_state_dict(ckpt: dict) -> dict:
    return {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("aux_heads.")}


def _eval_metrics(metrics: dict | None) -> dict:
    """The headline numbers of a ``busi-monai evaluate`` metrics.json (or any flat dict of numbers)."""
    if not metrics:
        return {}
    out: dict = {}
    for k, v in (metrics.get("lesion") or {}).items():
        if isinstance(v, (int, float)) and v is not None:
            out[f"lesion_mean_{k}"] = v
    for k in ("pixel_accuracy", "normal_false_positive_rate", "n_images", "n_lesion_images", "n_normal_images", "lesion_missed"):
        if isinstance(metrics.get(k), (int, float)):
            out[k] = metrics[k]
    if not out:  # a flat dict of numbers
        out = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for k in ("split", "data"):
        if isinstance(metrics.get(k), str):
            out[f"evaluated_{k}"] = metrics[k]
    return out


def _versions() -> dict:
    import monai
    import numpy

    req = {}
    for mod in ("PIL", "nibabel", "pytorch-ignite"):
        try:
            if mod == "PIL":
                import PIL

                req["pillow"] = PIL.__version__
            elif mod == "nibabel":
                import nibabel

                req["nibabel"] = nibabel.__version__
            else:
                import ignite

                req["pytorch-ignite"] = ignite.__version__
        except ImportError:
            pass
    return {
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": req,
    }


# What configs/train.json trains (MONAI's SupervisedTrainer, needing only MONAI): the paper's
# recipe. A checkpoint trained otherwise (e.g. `best`: Dice+BCE, busi-monai's batched ultrasound
# augmentation, cosine) is not reproduced by it, and the bundle says so.
TRAIN_JSON_RECIPE = {
    "loss": "bce", "augment": "none", "lr_schedule": "exponential", "weight_decay": 0.0,
    "optimizer": "adam", "sampler": "shuffle", "pad_square": False,
}  # fmt: skip


def train_json_reproduces(recipe: dict) -> bool:
    """Whether the bundle's train.json trains the recipe these weights were trained with."""
    return all(recipe.get(k, v) == v for k, v in TRAIN_JSON_RECIPE.items())


def make_metadata(ckpt: dict, version: str, eval_metrics: dict, image_size: int) -> dict:
    s = int(image_size)
    recipe = ckpt.get("recipe", {})
    return {
        "schema": SCHEMA_URL,
        "version": version,
        "changelog": {version: f"exported by busi-monai {__version__} from a '{ckpt.get('preset')}' preset checkpoint"},
        **_versions(),
        "name": "BUSI Attention U-Net",
        "task": "Breast lesion segmentation in 2D B-mode ultrasound images",
        "description": (
            "The improved Attention U-Net of J. Cheng for breast-lesion segmentation in ultrasound, built from "
            "MONAI blocks (depth 4, attention-gated skips, dropout). Input: one grayscale image resized to "
            f"{s}x{s} and scaled to [0, 1]. Output: one lesion logit channel; inference applies a sigmoid, "
            "resizes the probability back to the image's own size, thresholds it and keeps the paper's "
            "'processed mask' (small specks removed, components below 10% of the largest dropped, holes filled)."
        ),
        "authors": "busi-monai contributors (model after J. Cheng)",
        "copyright": "Copyright (c) busi-monai contributors",
        "data_source": BUSI_SOURCE,
        "data_type": "png",
        "image_classes": "single channel grayscale B-mode ultrasound intensity, scaled to [0, 1]",
        "label_classes": "single channel binary mask: 1 = breast lesion (benign or malignant), 0 = everything else",
        "pred_classes": "single channel: lesion logit (sigmoid -> lesion probability; > threshold -> lesion)",
        "eval_metrics": eval_metrics,
        "intended_use": (
            "Research and education only. Not a medical device and not validated for clinical use or diagnosis. "
            "Weights trained on BUSI inherit BUSI's research-use terms."
        ),
        "references": [PAPER, BUSI_PAPER],
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": "US",
                    "num_channels": 1,
                    "spatial_shape": [s, s],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": False,
                    "channel_def": {"0": "image"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": 1,
                    "spatial_shape": [s, s],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": False,
                    "channel_def": {"0": "lesion (logit; sigmoid gives the probability)"},
                }
            },
        },
        # Not part of the MONAI schema (which allows extra keys): what busi-monai needs to rebuild its checkpoint.
        "busi_monai": {
            "busi_monai_version": __version__,
            "preset": ckpt.get("preset"),
            "recipe": recipe,
            "preprocessing": {"image_size": s, "intensity": "minmax_0_1", "resize_mode": "bilinear"},
            "threshold": float(ckpt.get("threshold", 0.5)),
            # Scalar provenance the training run stored beside the weights (epoch, best_val_dice, ...).
            "training": {k: v for k, v in ckpt.items() if k not in CORE_KEYS and isinstance(v, (int, float, str, bool))},
            "train_json": {
                "recipe": "paper: BCE, Adam with exponential decay, no augmentation (MONAI SupervisedTrainer)",
                "reproduces_these_weights": train_json_reproduces(recipe),
                "these_weights_were_trained_by": f"busi-monai train --preset {ckpt.get('preset')} (recipe above)",
            },
        },
    }


def _trace(net: torch.nn.Module, image_size: int) -> torch.jit.ScriptModule:
    """TorchScript by tracing: ``torch.jit.script`` rejects the network's Python-side list handling
    (``reversed`` over the skip list) and its dataclass config; the traced eval graph is fully
    convolutional, so it serves any batch size and any size divisible by 16."""
    import warnings

    example = torch.rand(1, 1, image_size, image_size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(net.eval(), example, check_trace=True)


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _members(model) -> list[dict]:
    """The checkpoint(s) to export: one file, a run dir, a cross-validation dir (``fold*/model.pt``)
    or a list of those; all of one network and image size."""
    from busi_monai.inference.predictor import expand_ensemble
    from busi_monai.model.checkpoint import load_checkpoint

    members = [m if isinstance(m, dict) else load_checkpoint(m) for m in expand_ensemble(model if isinstance(model, list) else [model])]
    first = members[0]
    for m in members[1:]:
        if m["network"] != first["network"] or m["preprocessing"] != first["preprocessing"]:
            raise ValueError(f"{m.get('source', 'a member')}: the ensemble's members need one network and image size")
    if any(m.get("recipe", {}).get("pad_square") for m in members):
        # The bundle's configs resize by stretching; a padded-square model would see other inputs.
        raise ValueError("a pad_square model cannot be exported yet: the bundle's configs stretch to square")
    return members


def _readme(name: str, version: str, ckpt: dict, image_size: int, eval_metrics: dict, metrics_src: str | None, members: int = 1, flips: bool = False) -> str:
    text = (TEMPLATE / "docs" / "README.md").read_text()
    if eval_metrics:
        rows = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in eval_metrics.items())
        results = f"Measured by `busi-monai evaluate` ({metrics_src}):\n\n| metric | value |\n|---|---|\n{rows}\n"
    else:
        results = "not measured (the bundle was exported without `--metrics`).\n"
    recipe = ckpt.get("recipe", {})
    subs = {
        "{{name}}": name,
        "{{version}}": version,
        "{{image_size}}": str(image_size),
        "{{preset}}": str(ckpt.get("preset")),
        "{{epochs}}": str(recipe.get("epochs", "?")),
        "{{results}}": results,
        "{{busi_monai_version}}": __version__,
        "{{date}}": datetime.date.today().isoformat(),
    }
    for k, v in subs.items():
        text = text.replace(k, v)
    if not train_json_reproduces(recipe):
        text += (
            f"\n**`configs/train.json` does not reproduce these weights.** busi-monai trained them with its "
            f"`{ckpt.get('preset')}` recipe (loss `{recipe.get('loss')}`, augmentation `{recipe.get('augment')}`, "
            f"`{recipe.get('lr_schedule')}` schedule, {recipe.get('epochs')} epochs at {image_size} px), whose "
            "augmentation needs busi-monai; `configs/train.json` trains the paper's recipe (BCE, Adam with "
            "exponential decay, no augmentation) on the same network. To reproduce these weights run "
            f"`busi-monai train --preset {ckpt.get('preset')}` (the full recipe is `busi_monai.recipe` in "
            "`configs/metadata.json`).\n"
        )
    if members > 1 or flips:
        what = f"{members} networks (cross-validation folds)" if members > 1 else "the network"
        text += (
            f"\nThe bundle's network is the mean lesion probability of {what}"
            + (" and of their horizontally flipped views (test-time augmentation)" if flips else "")
            + ", as `busi-monai infer` computes it (`scripts.networks.AveragedNetwork`, returned as a logit). "
            "`configs/train.json` trains one network of the same kind.\n"
        )
    return text


def export_bundle(
    model: str | Path | dict,
    out: str | Path,
    name: str = "busi_attention_unet",
    version: str = "0.1.0",
    metrics: str | Path | dict | None = None,
    overwrite: bool = True,
) -> Path:
    """Write the bundle directory ``out`` (its name is the bundle's name) and return it."""
    from monai.data import save_net_with_metadata

    from busi_monai.model.checkpoint import model_from_checkpoint
    from busi_monai.model.networks import AveragedNetwork

    members = _members(model)
    ckpt = members[0]
    flips = bool(ckpt.get("recipe", {}).get("tta", False))
    averaged = len(members) > 1 or flips
    metrics_src = None
    if isinstance(metrics, (str, Path)):
        metrics_src = Path(metrics).name
        metrics = json.loads(Path(metrics).read_text())
    elif metrics is not None:
        metrics_src = "given metrics"
    eval_metrics = _eval_metrics(metrics)
    image_size = int(ckpt["preprocessing"]["image_size"])
    threshold = float(ckpt.get("threshold", 0.5))
    net_cfg = _bundle_network_config(ckpt)

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out}: exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target, then swap it in: a reader never sees half a bundle.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for rel in STATIC_FILES:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(TEMPLATE / rel, tmp / rel)
        net_src = Path(networks_module.__file__).read_text()
        header = (
            "# Generated by busi-monai export-bundle from busi_monai/model/networks.py; do not edit here.\n"
            "# Needs only torch and MONAI.\n"
        )
        (tmp / "scripts" / "networks.py").write_text(header + net_src)
        # The DICOM reader likewise (numpy and pydicom only): the bundle crops to the scan region as busi-monai does.
        dicom_header = header.replace("busi_monai/model/networks.py", "busi_monai/data/dicom.py").replace("torch and MONAI", "numpy and pydicom")
        (tmp / "scripts" / "dicom.py").write_text(dicom_header + Path(dicom_module.__file__).read_text())

        for cfg_name in ("inference.json", "train.json", "evaluate.json"):
            p = tmp / "configs" / cfg_name
            cfg = json.loads(p.read_text())
            # The recipe's post-processing, as busi-monai infer applies it.
            cfg["largest_only"] = bool(ckpt.get("recipe", {}).get("largest_component", False))
            if cfg_name != "evaluate.json":
                cfg["network_config"] = net_cfg
                cfg["image_size"] = image_size
                cfg["threshold"] = threshold
            if averaged and cfg_name != "train.json":
                # Inference and evaluation run the members' mean (as `busi-monai infer` does);
                # train.json trains one network of the same kind.
                cfg["network_def"] = {
                    "_target_": "scripts.networks.build_averaged",
                    "preset": "@network_config",
                    "members": len(members),
                    "flips": flips,
                }
            if cfg_name == "train.json":
                recipe = ckpt.get("recipe", {})
                # The bundle's trainer is the paper's recipe; keep the checkpoint's numbers where they are the paper's knobs.
                for key, rkey in (("epochs", "epochs"), ("batch_size", "batch_size"), ("learning_rate", "learning_rate"), ("lr_decay", "lr_decay")):
                    if rkey in recipe and recipe.get("lr_schedule", "exponential") == "exponential":
                        cfg[key] = recipe[rkey]
            p.write_text(dumps(cfg, indent=4) + "\n")

        meta = make_metadata(ckpt, version, eval_metrics, image_size)
        meta["name"] = name
        meta["busi_monai"]["averaged"] = {"members": len(members), "flips": flips} if averaged else None
        (tmp / "configs" / "metadata.json").write_text(dumps(meta, indent=4) + "\n")

        (tmp / "models").mkdir()
        nets = [model_from_checkpoint({**m, "network": net_cfg, "state_dict": _bundle_state_dict(m)}) for m in members]
        net = AveragedNetwork(nets, flips=flips) if averaged else nets[0]
        state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        torch.save(state, tmp / "models" / "model.pt")
        ts = _trace(net, image_size)
        save_net_with_metadata(
            ts,
            str(tmp / "models" / "model"),
            include_config_vals=False,
            append_timestamp=False,
            meta_values=meta,
            more_extra_files={"inference.json": (tmp / "configs" / "inference.json").read_bytes()},
        )

        (tmp / "docs").mkdir(exist_ok=True)
        (tmp / "docs" / "README.md").write_text(_readme(name, version, ckpt, image_size, eval_metrics, metrics_src, len(members), flips))

        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------------
# import


def checkpoint_from_bundle(bundle_dir: str | Path) -> dict:
    """A busi-monai checkpoint dict (as :func:`busi_monai.model.checkpoint.make_checkpoint`) from a bundle.

    For a bundle of averaged networks (an exported ensemble or test-time flips), the dict holds
    the first member's weights and ``members``, all of them: :class:`Predictor` serves the mean.

    The network, image size and threshold come from ``configs/inference.json`` (what the bundle
    runs); preset and recipe from ``metadata.json``'s ``busi_monai`` entry when present.
    """
    from busi_monai.model.checkpoint import CheckpointError
    from busi_monai.model.networks import NetworkConfig
    from busi_monai.training.recipes import get_recipe

    d = Path(bundle_dir)
    try:
        meta = json.loads((d / "configs" / "metadata.json").read_text())
        infer = json.loads((d / "configs" / "inference.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{d}: not a readable MONAI bundle ({e})") from None
    if not isinstance(infer.get("network_config"), dict):
        raise CheckpointError(f"{d}: configs/inference.json has no network_config (not a busi-monai bundle)")
    extra = meta.get("busi_monai") or {}
    image_size = int(infer.get("image_size") or extra.get("preprocessing", {}).get("image_size") or 256)
    threshold = float(infer.get("threshold", extra.get("threshold", 0.5)))
    network = NetworkConfig.from_dict(infer["network_config"]).to_dict()
    recipe = extra.get("recipe") or get_recipe("paper").with_overrides(image_size=image_size, threshold=threshold).to_dict()
    model_pt = d / "models" / "model.pt"
    try:
        state = torch.load(model_pt, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{model_pt}: not a readable state_dict ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a CheckpointSaver file from the bundle's own train.json
    averaged = infer.get("network_def", {}).get("_target_", "").endswith("build_averaged")
    if averaged:
        n = int(infer["network_def"]["members"])
        flips = bool(infer["network_def"].get("flips", False))
        recipe = {**recipe, "tta": flips}
        member_states = [{k.split(".", 2)[2]: v for k, v in state.items() if k.startswith(f"members.{i}.")} for i in range(n)]
        if any(not m for m in member_states):
            raise CheckpointError(f"{model_pt}: expected the weights of {n} averaged networks (members.0 .. members.{n - 1})")
        state = member_states[0]
    ck = {
        "format": "busi-monai/1",
        "busi_monai_version": extra.get("busi_monai_version", __version__),
        "preset": extra.get("preset"),
        "network": network,
        "recipe": recipe,
        "preprocessing": {"image_size": image_size, "intensity": "minmax_0_1", "resize_mode": "bilinear"},
        "threshold": threshold,
        "state_dict": state,
        **{k: v for k, v in (extra.get("training") or {}).items() if k not in CORE_KEYS},
        "source": str(d),
        "bundle_version": meta.get("version"),
    }
    if averaged:
        # Predictor serves all members (and flips); a training starts from the first one.
        ck["members"] = [{**ck, "state_dict": m} for m in member_states]
    return ck


# ---------------------------------------------------------------------------------------------
# CLI


def _cmd_export(a) -> None:
    path = export_bundle(a.model if len(a.model) > 1 else a.model[0], a.out, name=a.name, version=a.version, metrics=a.metrics)
    print(path)


def register_cli(sub) -> None:
    s = sub.add_parser("export-bundle", help="write a MONAI bundle (Model Zoo layout) of a trained model")
    s.add_argument("--model", required=True, nargs="+", help="busi-monai checkpoint(s) (model.pt), a run dir, or a cross-validation dir (its folds are averaged)")
    s.add_argument("--out", required=True, help="bundle directory to write (replaced if it exists)")
    s.add_argument("--name", default="busi_attention_unet")
    s.add_argument("--version", default="0.1.0")
    s.add_argument("--metrics", help="metrics.json of `busi-monai evaluate` for the model card")
    s.set_defaults(func=_cmd_export)
