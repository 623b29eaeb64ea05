"""What training validates on: probabilities of the cached validation images and the scores that pick the best epoch."""

from __future__ import annotations

import torch


@torch.no_grad()
def predict_cached(model, images: torch.Tensor, batch_size: int = 16, amp: bool = False) -> torch.Tensor:
    """Sigmoid probabilities of cached (N, 1, S, S) images, before any gate: validation judges
    the segmentation, and the gates are chosen afterwards on held-out images (crossval)."""
    model.eval()
    outs = []
    for i in range(0, images.shape[0], batch_size):
        x = images[i : i + batch_size]
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=amp):
            y = model.forward_parts(x)[0]
        outs.append(torch.sigmoid(y.float()))
    return torch.cat(outs) if outs else images.new_zeros(images.shape)


def image_scores(prob: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5) -> dict[str, torch.Tensor]:
    """Per image of (N, 1, S, S) probabilities: ``lesion`` (the truth has one), ``outlined``
    (the mask has one), ``dice`` against the truth, and ``top``, the highest probability."""
    pred = (prob > threshold).float().flatten(1)
    truth = labels.flatten(1)
    return {
        "lesion": truth.sum(1) > 0,
        "outlined": pred.sum(1) > 0,
        "dice": 2 * (pred * truth).sum(1) / (pred.sum(1) + truth.sum(1)).clamp(min=1),
        "top": prob.flatten(1).amax(1),
    }


def selection_scores(s: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per image of :func:`image_scores`: what model selection maximises, Dice on a lesion image
    and, on a normal image, 1 for an empty mask and 0 for a false outline."""
    return torch.where(s["lesion"], s["dice"], (~s["outlined"]).float())


def quick_scores(prob: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5) -> dict:
    """Validation numbers at training resolution: mean lesion Dice, normal false positives and
    the selection score over all images. A figure over an empty set (no lesion image, no
    normal image, no image) is ``None``, never NaN: it is not defined, and JSON has no NaN."""
    s = image_scores(prob, labels, threshold)
    has = s["lesion"]
    per_image = selection_scores(s)
    dice = per_image[has]
    normal_fp = s["outlined"][~has].float()
    mean = lambda t: float(t.mean()) if t.numel() else None  # noqa: E731
    return {"val_dice": mean(dice), "val_normal_fp": mean(normal_fp), "val_score": mean(per_image)}
