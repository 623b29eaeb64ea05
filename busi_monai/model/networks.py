"""The paper's improved Attention U-Net (Jun Cheng), written with MONAI's blocks.

Depth 4: four encoder blocks (64, 128, 256, 512 filters; dropout 0.25, 0.25, 0.3, 0.3), each
followed by 2x2 max-pooling, a bridge at 1/16 resolution, and four decoder stages (256, 128,
64, 32 filters; dropout 0.3, 0.3, 0.25, 0.25). Each decoder stage up-convolves, gates the
matching encoder skip with an attention gate whose intermediate filter count equals the
decoder's, concatenates and convolves. One output channel: the lesion logit.

The paper does not give the bridge's width; we keep the deepest encoder's 512 filters and
0.3 dropout (documented in the README) rather than doubling to 1024, which would add 9M
parameters for no stated reason.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn
from monai.networks.blocks import Convolution
from monai.networks.nets.attentionunet import AttentionBlock, ConvBlock, UpConv


@dataclass(frozen=True)
class NetworkConfig:
    encoder_channels: tuple[int, ...] = (64, 128, 256, 512)
    encoder_dropout: tuple[float, ...] = (0.25, 0.25, 0.3, 0.3)
    bridge_channels: int = 512
    bridge_dropout: float = 0.3
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32)
    decoder_dropout: tuple[float, ...] = (0.3, 0.3, 0.25, 0.25)
    in_channels: int = 1
    out_channels: int = 1
    deep_supervision: bool = False
    # At inference, an image whose highest lesion probability is below confidence_gate gets an
    # empty mask (0: off). The threshold still draws the outline; this decides whether there is one.
    confidence_gate: float = 0.0
    # "batch": MONAI's blocks as they are (batch norm). "instance": nnU-Net's instance norm, per
    # image, so that a click network's batches (a changing mix of no clicks, clicks, corrective
    # rounds, zoomed crops) do not move the statistics the automatic outline is drawn with.
    norm: str = "batch"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "NetworkConfig":
        d = dict(d)
        for k in ("encoder_channels", "encoder_dropout", "decoder_channels", "decoder_dropout"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


NETWORKS: dict[str, NetworkConfig] = {
    "paper": NetworkConfig(),
    # Same topology and dropout at a quarter of the width: ~16x fewer FLOPs, for CPU work and tests.
    "fast": NetworkConfig(
        encoder_channels=(16, 32, 64, 128), bridge_channels=128, decoder_channels=(64, 32, 16, 8)
    ),
    # Half the width (3.6M parameters): between the two, for the accuracy ablations.
    "half": NetworkConfig(
        encoder_channels=(32, 64, 128, 256), bridge_channels=256, decoder_channels=(128, 64, 32, 16)
    ),
}


NORMS = ("batch", "instance")


def _batch_to_instance_norm(module: nn.Module) -> None:
    """Each BatchNorm2d of MONAI's blocks (which hardcode it) as an affine InstanceNorm2d; an
    attention gate's one-channel norm before its sigmoid as nothing, since normalising one map
    per image would force half of every image's attention open."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, nn.InstanceNorm2d(child.num_features, affine=True) if child.num_features > 1 else nn.Identity())
        else:
            _batch_to_instance_norm(child)


class PaperAttentionUNet(nn.Module):
    def __init__(self, config: NetworkConfig = NetworkConfig()):
        super().__init__()
        c = config
        if not (len(c.encoder_channels) == len(c.encoder_dropout) == len(c.decoder_channels) == len(c.decoder_dropout)):
            raise ValueError("encoder and decoder need the same depth, with one dropout rate per level")
        if c.norm not in NORMS:
            raise ValueError(f"unknown norm {c.norm!r}; choose one of {', '.join(NORMS)}")
        self.config = c
        self.encoders = nn.ModuleList()
        prev = c.in_channels
        for ch, p in zip(c.encoder_channels, c.encoder_dropout):
            self.encoders.append(ConvBlock(2, prev, ch, dropout=p))
            prev = ch
        self.pool = nn.MaxPool2d(2)
        self.bridge = ConvBlock(2, prev, c.bridge_channels, dropout=c.bridge_dropout)
        prev = c.bridge_channels
        self.ups, self.gates, self.decoders = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for ch, p, skip in zip(c.decoder_channels, c.decoder_dropout, reversed(c.encoder_channels)):
            self.ups.append(UpConv(2, prev, ch, kernel_size=3, strides=2))
            self.gates.append(AttentionBlock(2, f_int=ch, f_g=ch, f_l=skip))
            self.decoders.append(ConvBlock(2, ch + skip, ch, dropout=p))
            prev = ch
        self.head = Convolution(2, prev, c.out_channels, kernel_size=1, conv_only=True)
        if c.deep_supervision:
            # Auxiliary 1x1 heads on the two coarser decoder stages; training only.
            self.aux_heads = nn.ModuleList(
                Convolution(2, ch, c.out_channels, kernel_size=1, conv_only=True) for ch in c.decoder_channels[1:3]
            )
        if c.norm == "instance":
            _batch_to_instance_norm(self)

    def forward_parts(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The ungated lesion logit and the deep-supervision logits (training only).

        A click-guided network (``in_channels`` 3: image, foreground clicks, background clicks;
        4: and the previous outline) given the image alone gets empty guidance maps, so it is also the automatic model and every
        caller that knows nothing of clicks (Grad-CAM, active learning, the bundle) works."""
        if x.shape[1] < self.config.in_channels:
            x = torch.cat((x, x.new_zeros((x.shape[0], self.config.in_channels - x.shape[1], *x.shape[2:]))), dim=1)
        skips = []
        for enc in self.encoders:
            x = enc(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bridge(x)
        stages = []
        for up, gate, dec, skip in zip(self.ups, self.gates, self.decoders, reversed(skips)):
            g = up(x)
            x = dec(torch.cat((gate(g=g, x=skip), g), dim=1))
            stages.append(x)
        aux = [h(s) for h, s in zip(self.aux_heads, stages[1:3])] if self.config.deep_supervision and self.training else []
        return self.head(x), aux

    def forward(self, x: torch.Tensor):
        """The lesion logit (through the confidence gate at inference); in training with deep
        supervision, a list: the logit, then the auxiliary logits."""
        out, aux = self.forward_parts(x)
        if aux:
            return [out, *aux]
        return confidence_gated(out, self.config.confidence_gate) if not self.training else out


GATED_LOGIT = -20.0  # what a gated-off image's pixels get: a probability of 2e-9


def confidence_gated(logit: torch.Tensor, gate: float) -> torch.Tensor:
    """The logits of the images whose highest lesion probability reaches ``gate``; the others'
    set to background (``gate`` 0: all kept). Normal images mostly fail it: they get no outline."""
    if gate <= 0:
        return logit
    keep = torch.sigmoid(logit.float()).amax(dim=(-2, -1), keepdim=True) >= gate
    return torch.where(keep, logit.float(), torch.full_like(logit, GATED_LOGIT, dtype=torch.float32))


# Options a network spec can switch on (+) or off (-), e.g. "paper+ds", "fast+clicks".
NETWORK_OPTIONS = {
    # deep supervision: auxiliary heads on two coarser decoder stages (training only)
    "ds": lambda cfg, on: replace(cfg, deep_supervision=on),
    # click guidance: two more input channels, the foreground- and background-click maps
    "clicks": lambda cfg, on: replace(cfg, in_channels=3 if on else 1),
    # the previous outline as a fourth input channel (after the click maps), so that a click
    # corrects the outline locally instead of redrawing it (RITM, nnInteractive)
    "prev": lambda cfg, on: _with_previous(cfg, on),
    # "-dropout": no dropout, a network whose training steps are deterministic (runs over
    # several workers are compared step by step with one process on it: their draws differ)
    "dropout": lambda cfg, on: cfg if on else _without_dropout(cfg),
    # instance norm instead of batch norm (NetworkConfig.norm)
    "instancenorm": lambda cfg, on: replace(cfg, norm="instance" if on else "batch"),
}

# The guidance options of the click model the app serves and `interactive` trains, and its
# per-image normalisation (chosen on a held-out fold: docs/interactive.md).
CLICK_OPTIONS = "+clicks+prev+instancenorm"


def _without_dropout(cfg: NetworkConfig) -> NetworkConfig:
    zeros = lambda rates: (0.0,) * len(rates)  # noqa: E731
    return replace(cfg, encoder_dropout=zeros(cfg.encoder_dropout), bridge_dropout=0.0, decoder_dropout=zeros(cfg.decoder_dropout))


def _with_previous(cfg: NetworkConfig, on: bool) -> NetworkConfig:
    if on and cfg.in_channels < 3:
        raise ValueError("option +prev needs +clicks before it (the previous outline comes after the click maps)")
    return replace(cfg, in_channels=4 if on else min(cfg.in_channels, 3))


def network_config(spec: str) -> NetworkConfig:
    """A named network, optionally with :data:`NETWORK_OPTIONS` switched on or off:
    ``paper+ds``, ``fast-ds``, ``fast+clicks``."""
    import re

    name, *changes = re.split(r"(?=[+-])", spec)
    if name not in NETWORKS:
        raise ValueError(f"unknown network {name!r}; choose one of {', '.join(NETWORKS)}")
    cfg = NETWORKS[name]
    for change in changes:
        option = NETWORK_OPTIONS.get(change[1:])
        if option is None:
            raise ValueError(f"unknown network option {change[1:]!r} in {spec!r}; options: {', '.join(NETWORK_OPTIONS)}")
        cfg = option(cfg, change[0] == "+")
    return cfg


def takes_clicks(spec: str) -> bool:
    """Whether the network of a spec reads click maps (option ``+clicks``)."""
    return network_config(spec).in_channels > 1


def takes_previous(spec_or_config: str | NetworkConfig) -> bool:
    """Whether the network reads the previous outline (option ``+prev``)."""
    cfg = spec_or_config if isinstance(spec_or_config, NetworkConfig) else network_config(spec_or_config)
    return cfg.in_channels > 3


def with_click_guidance(spec: str) -> str:
    """A network spec with the click model's guidance options (:data:`CLICK_OPTIONS`) added
    where they are missing: the network the app serves for both the automatic and the click tool."""
    cfg = network_config(spec)
    if cfg.in_channels >= 4:
        return spec
    norm = "" if cfg.norm == "instance" else "+instancenorm"
    return spec + ("+prev" + norm if cfg.in_channels == 3 else CLICK_OPTIONS)


def without_click_guidance(spec: str) -> str:
    """A click network's spec without the click model's options (:data:`CLICK_OPTIONS`): the
    automatic network the app trains beside it (``fast+clicks+prev+instancenorm`` -> ``fast``).
    A network that takes no clicks is returned as it is."""
    import re

    if not takes_clicks(spec):
        return spec
    name, *changes = re.split(r"(?=[+-])", spec)
    return name + "".join(c for c in changes if c[1:] not in ("clicks", "prev", "instancenorm"))


@runtime_checkable
class SegmentationNetwork(Protocol):
    """What the rest of busi-monai needs of a network, so that another architecture can be added
    without reading every caller: called on (N, 1, S, S) images in [0, 1] it returns (N, 1, S, S)
    lesion logits (an image under the config's confidence gate gets an empty mask)."""

    config: NetworkConfig  # stored in every checkpoint; rebuilt by build_network(config)
    bridge: nn.Module  # the deepest features: active learning's embeddings hook here
    gates: nn.ModuleList  # attention gates, coarse to fine: explain's attention maps hook here

    def forward_parts(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Training's forward: the logits before the gate, and the deep-supervision logits."""
        ...

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


def build_network(preset: str | NetworkConfig | dict = "paper") -> SegmentationNetwork:
    """A named network (``paper``, ``fast``, ``half``, with options as :func:`network_config`
    reads them) or an explicit config."""
    if isinstance(preset, NetworkConfig):
        return PaperAttentionUNet(preset)
    if isinstance(preset, dict):
        return PaperAttentionUNet(NetworkConfig.from_dict(preset))
    return PaperAttentionUNet(network_config(preset))


class AveragedNetwork(nn.Module):
    """The mean lesion probability of several networks (cross-validation folds) and, with
    ``flips``, of each one's horizontally flipped view (test-time augmentation).

    Returned as a logit, so it drops in wherever one network goes: ``sigmoid`` gives the mean
    probability back, and the bundle's configs and TorchScript need no other change. The
    members' confidence gate judges the mean, not each member: on the BUSI test split, with the
    5-fold `best` ensemble at gate 0.8, gating each member left 8 of 21 normal images with an
    outline and gating the mean 2 (the 7% its folds gave on held-out images), for 8 more
    lesions left without one.
    """

    def __init__(self, members: list[PaperAttentionUNet], flips: bool = False):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.flips = flips

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return confidence_gated(self.forward_ungated(x), self.members[0].config.confidence_gate)

    def forward_ungated(self, x: torch.Tensor) -> torch.Tensor:
        """The mean as a logit, before the confidence gate."""
        probs = []
        for net in self.members:
            probs.append(torch.sigmoid(net.forward_parts(x)[0].float()))
            if self.flips:
                probs.append(torch.flip(torch.sigmoid(net.forward_parts(torch.flip(x, dims=(-1,)))[0].float()), dims=(-1,)))
        return torch.logit(torch.stack(probs).mean(0), eps=1e-6)


def build_averaged(preset: str | NetworkConfig | dict, members: int, flips: bool = False) -> AveragedNetwork:
    """``members`` networks of one preset or config, averaged (the bundle's ensemble network)."""
    return AveragedNetwork([build_network(preset) for _ in range(int(members))], flips=bool(flips))


def attention_gate_modules(net: PaperAttentionUNet) -> list[nn.Module]:
    """The sigmoid of each gate (coarse to fine), whose outputs are the attention coefficients."""
    return [g.psi[-1] for g in net.gates]
