"""Augmentations by name (a recipe's ``augment``): batched tensor ops on the batch's own device."""

from __future__ import annotations

import math
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


class NnUNetAugment(torch.nn.Module):
    """nnU-Net v2's 2D augmentation of whole (B, 1, S, S) batches in [0, 1] on their own device.

    Each sample draws its own parameters, with nnU-Net's probabilities and ranges: rotation
    (p 0.2) and scaling 0.7-1.4 (p 0.2) through one sampling grid for image and mask, Gaussian
    noise (variance up to 0.1 of the image's, p 0.1), Gaussian blur (sigma 0.5-1, p 0.2),
    brightness x0.75-1.25 (p 0.15), contrast x0.75-1.25 around the mean within the image's
    range (p 0.15), low-resolution simulation (nearest down to 1/2-1 of the size, bilinear up;
    p 0.25), gamma 0.7-1.5 on the inverted image (p 0.1) and on the image (p 0.3), and mirroring.

    Two departures, both for ultrasound's geometry (the probe is at the top): rotation within
    ``max_rotation_deg`` (nnU-Net: any angle) and mirroring left-right only (nnU-Net: both axes).

    Args:
        max_rotation_deg: the largest rotation either way.
        low_res_levels: low-resolution zooms are drawn from this many steps of 1/2-1, so that the
            batch needs that many resamplings and no per-sample loop.
    """

    def __init__(self, max_rotation_deg: float = 30.0, low_res_levels: int = 4):
        super().__init__()
        self.max_rotation = math.radians(max_rotation_deg)
        self.zooms = [0.5 + 0.5 * i / low_res_levels for i in range(low_res_levels)]

    @torch.no_grad()
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import torch.nn.functional as F

        b, dev, size = x.shape[0], x.device, x.shape[-2:]

        def chance(p):
            return (torch.rand(b, device=dev) < p).view(b, 1, 1, 1)

        def uniform(lo, hi, *shape):
            return lo + (hi - lo) * torch.rand(b, *shape, device=dev)

        # Spatial: rotation and scaling (zoom in or out), one grid for image and mask.
        rot = (torch.rand(b, device=dev) < 0.2).float()
        ang = uniform(-1, 1) * self.max_rotation * rot
        zoom = torch.where(torch.rand(b, device=dev) < 0.2, uniform(0.7, 1.4), torch.ones(b, device=dev))
        cos, sin = torch.cos(ang) / zoom, torch.sin(ang) / zoom
        zero = torch.zeros_like(cos)
        theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        y = (F.grid_sample(y, grid, mode="bilinear", padding_mode="zeros", align_corners=False) > 0.5).to(y.dtype)
        lo, hi = x.amin(dim=(-2, -1), keepdim=True), x.amax(dim=(-2, -1), keepdim=True)
        # Gaussian noise, its variance up to 0.1 of the image's (nnU-Net's images have unit variance).
        std = x.std(dim=(-2, -1), keepdim=True) * uniform(0, 0.1, 1, 1, 1).sqrt()
        x = torch.where(chance(0.1), x + std * torch.randn_like(x), x)
        x = torch.where(chance(0.2), _gaussian_blur(x, uniform(0.5, 1.0)), x)
        x = torch.where(chance(0.15), x * uniform(0.75, 1.25, 1, 1, 1), x)
        mean = x.mean(dim=(-2, -1), keepdim=True)
        contrast = ((x - mean) * uniform(0.75, 1.25, 1, 1, 1) + mean).clamp(min=lo, max=hi)
        x = torch.where(chance(0.15), contrast, x)
        level = torch.randint(len(self.zooms), (b, 1, 1, 1), device=dev)
        low = x
        for i, z in enumerate(self.zooms):  # every level on the whole batch: no host sync, no per-sample loop
            small = F.interpolate(x, size=[max(1, int(s * z)) for s in size], mode="nearest")
            low = torch.where(level == i, F.interpolate(small, size=list(size), mode="bilinear", align_corners=False), low)
        x = torch.where(chance(0.25), low, x)
        x = x.clamp(0, 1)
        x = torch.where(chance(0.1), 1 - (1 - x).clamp(min=1e-6) ** uniform(0.7, 1.5, 1, 1, 1), x)
        x = torch.where(chance(0.3), x.clamp(min=1e-6) ** uniform(0.7, 1.5, 1, 1, 1), x)
        flip = chance(0.5)
        x = torch.where(flip, x.flip(-1), x)
        y = torch.where(flip, y.flip(-1), y)
        return x.clamp_(0, 1), y


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Each (1, S, S) sample of ``x`` blurred with its own ``sigma`` (up to ~1.2): one separable
    grouped convolution for the whole batch."""
    import torch.nn.functional as F

    b, c = x.shape[:2]
    r = 3
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None] / sigma.view(b, 1).to(x.dtype)) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (b*c, 2r+1)
    z = x.reshape(1, b * c, *x.shape[-2:])
    z = F.conv2d(F.pad(z, (r, r, 0, 0), mode="reflect"), k[:, None, None, :], groups=b * c)
    z = F.conv2d(F.pad(z, (0, 0, r, r), mode="reflect"), k[:, None, :, None], groups=b * c)
    return z.reshape(x.shape)


# A recipe's ``augment`` names one of these; adding a kind is one entry here.
AUGMENTATIONS: dict[str, Callable[[], torch.nn.Module | None]] = {
    "none": lambda: None,  # the paper's
    "ultrasound": BatchAugment,
    "ultrasound+elastic": lambda: BatchAugment(p_elastic=0.3),  # and an elastic warp in 30% of the samples
    "nnunet": NnUNetAugment,
}


def augmentation(kind: str) -> torch.nn.Module | None:
    """The batched augmentation a recipe's ``augment`` names (None: no augmentation)."""
    if kind not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {kind!r}; choose one of {', '.join(AUGMENTATIONS)}")
    return AUGMENTATIONS[kind]()
