"""Augmentations by name (a recipe's ``augment``): batched tensor ops on the batch's own device."""

from __future__ import annotations

from collections.abc import Callable

import torch


class BatchAugment(torch.nn.Module):
    """Ultrasound augmentation of whole (B, 1, S, S) batches on their own device.

    Per-sample MONAI dictionary transforms cost ~1 ms of Python per image, which dominates a
    GPU epoch; the same operations as batched tensor ops cost microseconds. Each sample draws
    its own parameters: horizontal flip (the probe is at the top, so no vertical flip), an
    affine (+-15 deg, scale 0.85-1.15, shift +-6%), gamma 0.7-1.5, brightness/contrast,
    blur (MONAI's GaussianFilter) and multiplicative speckle-like noise. With ``p_elastic``, an
    elastic warp too (a smooth random displacement, ``elastic_sigma`` of the half-width at
    each point of a ``elastic_grid``-square control grid, bicubic between), through the same
    sampling grid as the affine so image and mask move together.
    """

    def __init__(
        self, p_affine: float = 0.7, p_gamma: float = 0.3, p_contrast: float = 0.3, p_blur: float = 0.2, p_noise: float = 0.3,
        p_elastic: float = 0.0, elastic_sigma: float = 0.04, elastic_grid: int = 5,
    ):  # fmt: skip
        super().__init__()
        from monai.networks.layers import GaussianFilter

        self.p = dict(affine=p_affine, gamma=p_gamma, contrast=p_contrast, blur=p_blur, noise=p_noise, elastic=p_elastic)
        self.elastic_sigma, self.elastic_grid = elastic_sigma, elastic_grid
        self.blur = GaussianFilter(spatial_dims=2, sigma=1.0)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import math

        import torch.nn.functional as F

        b, dev = x.shape[0], x.device

        def chance(p):
            return (torch.rand(b, device=dev) < p).view(b, 1, 1, 1)

        flip = chance(0.5)
        x = torch.where(flip, x.flip(-1), x)
        y = torch.where(flip, y.flip(-1), y)
        use = (torch.rand(b, device=dev) < self.p["affine"]).float()
        ang = (torch.rand(b, device=dev) * 2 - 1) * math.radians(15) * use
        scale = 1 + (torch.rand(b, device=dev) * 2 - 1) * 0.15 * use
        shift = (torch.rand(b, 2, device=dev) * 2 - 1) * 0.12 * use[:, None]
        cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        if self.p["elastic"] > 0:  # drawn only when on, so `ultrasound` keeps its random stream
            g = self.elastic_grid
            coarse = torch.randn(b, 2, g, g, device=dev) * self.elastic_sigma * chance(self.p["elastic"])
            grid = grid + F.interpolate(coarse, size=tuple(x.shape[-2:]), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        y = (F.grid_sample(y, grid, mode="bilinear", padding_mode="zeros", align_corners=False) > 0.5).to(y.dtype)
        gamma = torch.exp((torch.rand(b, 1, 1, 1, device=dev) * 2 - 1) * 0.4)
        x = torch.where(chance(self.p["gamma"]), x.clamp(min=1e-6) ** gamma, x)
        a = 1 + (torch.rand(b, 1, 1, 1, device=dev) * 2 - 1) * 0.15
        c = (torch.rand(b, 1, 1, 1, device=dev) * 2 - 1) * 0.08
        x = torch.where(chance(self.p["contrast"]), x * a + c, x)
        x = torch.where(chance(self.p["blur"]), self.blur(x), x)
        sigma = torch.rand(b, 1, 1, 1, device=dev) * 0.12
        x = torch.where(chance(self.p["noise"]), x * (1 + sigma * torch.randn_like(x)), x)
        return x.clamp_(0, 1), y


# A recipe's ``augment`` names one of these; adding a kind is one entry here.
AUGMENTATIONS: dict[str, Callable[[], BatchAugment | None]] = {
    "none": lambda: None,  # the paper's
    "ultrasound": BatchAugment,
    "ultrasound+elastic": lambda: BatchAugment(p_elastic=0.3),  # and an elastic warp in 30% of the samples
}


def augmentation(kind: str) -> BatchAugment | None:
    """The batched augmentation a recipe's ``augment`` names (None: no augmentation)."""
    if kind not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {kind!r}; choose one of {', '.join(AUGMENTATIONS)}")
    return AUGMENTATIONS[kind]()
