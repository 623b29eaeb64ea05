"""Training recipes. One place that the CLI, the MONAI Label app and the bundle read."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class Recipe:
    network: str  # model.networks.network_config spec: a key of NETWORKS, e.g. "fast+ds"
    image_size: int = 256
    epochs: int = 50
    batch_size: int = 4
    learning_rate: float = 1e-3
    # Paper: "a learning rate decay strategy". We decay exponentially per epoch so the
    # rate falls ~13x over 50 epochs; `cosine` for longer schedules.
    lr_schedule: str = "exponential"
    lr_decay: float = 0.95
    weight_decay: float = 0.0
    loss: str = "bce"  # training.losses.LOSSES: "bce" (paper), "dice_bce", "dice_ce_batch"
    augment: str = "none"  # training.augmentation.AUGMENTATIONS: "none" (paper), "ultrasound", "ultrasound+elastic"
    val_fraction: float = 0.1  # carved, by duplicate group, from the training split
    threshold: float = 0.5
    tta: bool = False
    # The network's confidence gate (networks.NetworkConfig): images whose highest lesion
    # probability stays below it get an empty mask. `busi-monai cv` re-chooses it on held-out folds.
    confidence_gate: float = 0.0
    # Click-guided networks ("+clicks"): the share of each batch trained without clicks (the
    # automatic model), the most corrective clicks simulated from the model's own errors, and
    # the click maps' Gaussian sigma in pixels at the network's input size.
    click_free_fraction: float = 0.3
    click_rounds: int = 3
    click_sigma: float = 3.0
    # Networks with the previous-outline channel ("+prev"): the share of clicked images whose
    # first click corrects the model's own automatic outline, given as the previous outline
    # (RITM's iterative training); the others start from a click inside the truth, no outline.
    outline_first_fraction: float = 0.75
    # Zoom-in refinement (click networks): the share of lesion images in a batch trained on a
    # crop around the lesion (margin drawn around zoom_margin, centre jittered by zoom_jitter of
    # the side), resampled from a cache at twice the network's size. Above 0, inference also
    # re-segments a crop around the outline, clicks and box (busi_monai.interactive.zoom).
    zoom_fraction: float = 0.5
    zoom_margin: float = 0.4
    zoom_jitter: float = 0.15
    zoom_min_side: float = 0.25
    # The nnU-Net ingredients (preset `full`); each default keeps the earlier presets as they were.
    optimizer: str = "adam"  # training.optimizers.OPTIMIZERS: "adam" (paper), "sgd_nesterov"
    momentum: float = 0.99  # sgd_nesterov only
    poly_exponent: float = 0.9  # lr_schedule "poly": lr * (1 - epoch / epochs) ** poly_exponent
    # Deep-supervision weights (networks with "+ds"): "exp" MONAI's 1, 1/2, 1/4 as they are;
    # "halving" the same normalised to sum 1, as nnU-Net does.
    ds_weights: str = "exp"
    sampler: str = "shuffle"  # training.sampling.SAMPLERS: "shuffle" (paper), "foreground"
    foreground_fraction: float = 0.33  # "foreground": share of each batch that holds lesion pixels
    # Keep each image's aspect ratio: resize its longer side to image_size and pad to a square
    # (False: stretch to the square, the paper's). Inference reads it from the checkpoint's recipe.
    pad_square: bool = False
    # Post-processing: keep only the largest lesion component of each processed mask.
    largest_component: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    def with_overrides(self, **kw) -> "Recipe":
        unknown = set(kw) - set(self.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown recipe field(s): {', '.join(sorted(unknown))}")
        return replace(self, **{k: v for k, v in kw.items() if v is not None})

    @classmethod
    def parse_override(cls, text: str) -> tuple[str, object]:
        """``key=value`` from the command line, typed like the field."""
        key, _, value = text.partition("=")
        if key not in cls.__dataclass_fields__:
            raise ValueError(f"unknown recipe field {key!r}; fields: {', '.join(cls.__dataclass_fields__)}")
        default = getattr(PRESETS["paper"], key)
        if isinstance(default, bool):
            return key, value.lower() in ("1", "true", "yes", "on")
        return key, type(default)(value)


PRESETS: dict[str, Recipe] = {
    # Exactly the paper: BCE, Adam 1e-3 with decay, batch 4, 50 epochs, 256x256, no augmentation.
    "paper": Recipe(network="paper"),
    # The CPU preset: the paper's recipe at a quarter of the width and 128 px, so that its 50
    # epochs on BUSI fit in a labelling session on two cores (timings: BENCHMARKS.md).
    "fast": Recipe(network="fast", image_size=128),
    # What measured best on BUSI's held-out folds (README, Results, with each ingredient's
    # ablation): the fast network at 128 px with an overlap loss, ultrasound augmentation, a
    # cosine schedule and a third of each batch with lesion pixels (nnU-Net's sampler, which
    # halved normal false positives), and a confidence gate that leaves unsure images empty
    # (`busi-monai cv` re-chooses it on its held-out folds).
    "best": Recipe(
        network="fast",
        image_size=128,
        lr_schedule="cosine",
        loss="dice_bce",
        augment="ultrasound",
        sampler="foreground",
        foreground_fraction=0.33,
        confidence_gate=0.8,
    ),
    # The first model `make serve` trains, so that "Run" in Slicer outlines lesions after a CPU
    # minute: the paper's plain BCE learns too slowly for that, Dice+BCE at a higher rate does;
    # on ~25 sample images (6 steps an epoch) per-epoch decay left every mask empty, batch 2 with
    # a cosine schedule does not. The Train button then uses the app's own preset.
    "warmup": Recipe(
        network="fast",
        image_size=96,
        epochs=40,
        batch_size=2,
        learning_rate=3e-3,
        lr_schedule="cosine",
        loss="dice_bce",
        val_fraction=0.15,
    ),
    # The click-guided model (MONAI Label's DeepGrow/DeepEdit idea, with RITM's and
    # nnInteractive's refinements): `best`'s recipe (without its foreground sampler, not yet
    # measured with clicks) on the fast network with two click-map channels and the previous
    # outline as a fourth. A share of each batch trains without clicks, so one network is both
    # the automatic and the click model; the rest gets a first click (on its own automatic
    # outline, or inside the truth) and up to `click_rounds` corrective clicks from its own
    # errors; half the lesion images are zoomed crops. Instance norm instead of batch norm: the
    # batches mix unguided, clicked and zoomed images, and batch norm's statistics followed the
    # mix (docs/interactive.md). On a GPU at full size:
    # --set network=paper+clicks+prev+instancenorm --image-size 256.
    "interactive": Recipe(
        network="fast+clicks+prev+instancenorm",
        image_size=128,
        lr_schedule="cosine",
        loss="dice_bce",
        augment="ultrasound",
    ),
    # The full-size recipe (#19): the paper network with deep supervision at 256 px and nnU-Net
    # v2's 2D ingredients that held up on the CPU-scale CV (README, Results): deep-supervision
    # weights halving per stage, a third of each batch with lesion pixels, nnU-Net's
    # augmentation, a long schedule. Not nnU-Net's SGD (NNUNET_SGD below): at the iterations a
    # GPU run gets it lost in both CPU-scale tests, so `full` keeps `best`'s Adam and cosine
    # schedule. Not nnU-Net's batch Dice: it lost most on the screen. The GPU script's ablations
    # measure each choice at full size (gpu_full_cv.py --ablations).
    "full": Recipe(
        network="paper+ds",
        image_size=256,
        epochs=300,
        batch_size=16,
        lr_schedule="cosine",
        loss="dice_bce",
        ds_weights="halving",
        sampler="foreground",
        foreground_fraction=0.33,
        augment="nnunet",
    ),
}


# nnU-Net v2's optimiser and schedule, as overrides: SGD with Nesterov momentum 0.99 at 1e-2,
# weight decay 3e-5, polynomial decay (exponent 0.9).
NNUNET_SGD: dict = {
    "optimizer": "sgd_nesterov", "momentum": 0.99, "learning_rate": 1e-2, "weight_decay": 3e-5,
    "lr_schedule": "poly", "poly_exponent": 0.9,
}  # fmt: skip


def get_recipe(preset: str) -> Recipe:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[preset]
