"""The paper's architecture, checked on the built module rather than on a config."""

import pytest
import torch
from monai.networks.blocks import Convolution
from monai.networks.nets.attentionunet import AttentionBlock

from busi_monai import build_network
from busi_monai.model.networks import attention_gate_modules


def _dropouts(block):
    return {m.p for m in block.modules() if isinstance(m, torch.nn.Dropout2d | torch.nn.Dropout)}


def _out_channels(block):
    convs = [m for m in block.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d)]
    return convs[-1].out_channels


def test_paper_preset_matches_the_paper():
    net = build_network("paper")
    assert [_out_channels(e) for e in net.encoders] == [64, 128, 256, 512]
    assert [_dropouts(e) for e in net.encoders] == [{0.25}, {0.25}, {0.3}, {0.3}]
    assert [_out_channels(d) for d in net.decoders] == [256, 128, 64, 32]
    assert [_dropouts(d) for d in net.decoders] == [{0.3}, {0.3}, {0.25}, {0.25}]
    # One attention gate per skip connection, its filters equal to the decoder's.
    assert len(net.gates) == 4 and all(isinstance(g, AttentionBlock) for g in net.gates)
    assert [g.W_g[0].conv.out_channels for g in net.gates] == [256, 128, 64, 32]
    assert isinstance(net.head, Convolution) and net.head.conv.out_channels == 1


def test_forward_shape_and_attention_maps():
    net = build_network("fast").eval()
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o.shape)) for m in attention_gate_modules(net)]
    with torch.no_grad():
        y = net(torch.rand(2, 1, 256, 256))
    for h in hooks:
        h.remove()
    assert y.shape == (2, 1, 256, 256)
    assert [s[-1] for s in seen] == [32, 64, 128, 256]


def test_fast_keeps_topology_at_reduced_width():
    paper, fast = build_network("paper"), build_network("fast")
    assert len(fast.encoders) == len(paper.encoders) == 4
    assert [_dropouts(e) for e in fast.encoders] == [_dropouts(e) for e in paper.encoders]
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(fast) * 8 < n(paper)


def test_deep_supervision_only_in_training():
    net = build_network("paper+ds")
    x = torch.rand(1, 1, 128, 128)
    net.train()
    outs = net(x)
    assert isinstance(outs, list) and outs[0].shape == (1, 1, 128, 128) and len(outs) == 3
    net.eval()
    with torch.no_grad():
        assert net(x).shape == (1, 1, 128, 128)


def test_network_specs_switch_options():
    from busi_monai.model.networks import network_config

    cfg = network_config("fast+ds")
    assert cfg.deep_supervision and cfg.encoder_channels == (16, 32, 64, 128)
    assert network_config("paper+ds-ds").deep_supervision is False
    assert network_config("half").encoder_channels == (32, 64, 128, 256)
    for bad, message in (("fast+wings", "unknown network option 'wings'"), ("wide", "unknown network 'wide'"), ("fast+prev", "needs +clicks")):
        try:
            network_config(bad)
        except ValueError as e:
            assert message in str(e)
        else:
            raise AssertionError(f"{bad!r} was accepted")


def test_confidence_gate_empties_unsure_images_at_inference_only():
    from dataclasses import replace

    from busi_monai.model.networks import GATED_LOGIT

    torch.manual_seed(0)
    net = build_network("fast").eval()
    x = torch.rand(6, 1, 64, 64)
    with torch.no_grad():
        raw = net(x)
        top = torch.sigmoid(raw).amax(dim=(1, 2, 3))
        gate = float(top.median())
        net.config = replace(net.config, confidence_gate=gate)
        gated = net(x)
    kept = top >= gate
    assert 0 < int(kept.sum()) < len(kept)
    assert torch.equal(gated[kept], raw[kept]) and (gated[~kept] == GATED_LOGIT).all()
    net.train()
    torch.manual_seed(1)
    a = net(x)
    net.config = replace(net.config, confidence_gate=0.0)
    torch.manual_seed(1)
    assert torch.equal(a, net(x)), "training must see every logit"


@pytest.mark.parametrize("name", ["paper", "fast", "half", "fast+ds"])
def test_every_network_satisfies_the_written_protocol(name):
    """Training, explanation, active learning and the gate rely on SegmentationNetwork only."""
    from busi_monai.model.networks import SegmentationNetwork, build_network

    net = build_network(name).eval()
    assert isinstance(net, SegmentationNetwork)
    x = torch.rand(2, 1, 32, 32)
    seg, aux = net.forward_parts(x)
    assert seg.shape == net(x).shape == (2, 1, 32, 32) and aux == []
    assert len(net.gates) == 4 and net.config == build_network(net.config.to_dict()).config


class _Ramp(torch.nn.Module):
    """A member whose logit rises from left to right whatever the image: the flip shows."""

    def __init__(self, config):
        super().__init__()
        self.config = config

    def forward_parts(self, x):
        cols = torch.arange(x.shape[-1], dtype=torch.float32)
        return (0.5 * cols - 2.0).expand(x.shape[0], 1, x.shape[-2], x.shape[-1]).clone(), []


def test_flip_averaging_has_a_known_answer_with_an_asymmetric_network():
    from busi_monai.model.networks import AveragedNetwork, NetworkConfig

    net = AveragedNetwork([_Ramp(NetworkConfig())], flips=True)
    x = torch.zeros(1, 1, 2, 4)
    p = torch.sigmoid(net.forward_ungated(x))[0, 0, 0]
    # Columns 0..3: sigmoid(0.5c - 2) as is, and mirrored (the flipped view's logit of column c
    # is its own column 3 - c): the mean of the two.
    own = torch.sigmoid(torch.tensor([-2.0, -1.5, -1.0, -0.5]))
    torch.testing.assert_close(p, (own + own.flip(0)) / 2, atol=1e-5, rtol=0)
    plain = torch.sigmoid(AveragedNetwork([_Ramp(NetworkConfig())], flips=False).forward_ungated(x))[0, 0, 0]
    torch.testing.assert_close(plain, own, atol=1e-5, rtol=0)


def test_instance_norm_makes_an_image_s_output_independent_of_its_batch():
    """In training, batch norm normalises each image with its batch's statistics, so what the
    network answers for an image depends on the images beside it (a click network's batches mix
    guided and unguided ones); instance norm does not. Checked both ways, so the check can fail."""
    from busi_monai.model.checkpoint import make_checkpoint, model_from_checkpoint
    from busi_monai.model.networks import network_config
    from busi_monai.training.recipes import get_recipe

    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.rand(1, 4, 32, 32, generator=g) for _ in range(3))
    c = c * 3 + 1  # a companion with other statistics
    for spec, independent in (("fast+clicks+prev-dropout", False), ("fast+clicks+prev-dropout+instancenorm", True)):
        torch.manual_seed(0)
        net = build_network(network_config(spec)).train()
        with torch.no_grad():
            with_b, with_c = net(torch.cat((a, b)))[0], net(torch.cat((a, c)))[0]
        assert torch.allclose(with_b, with_c, atol=1e-5) == independent, spec
    cfg = network_config("fast+clicks+prev+instancenorm")
    assert cfg.norm == "instance" and network_config("fast").norm == "batch"
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    # The choice travels with the checkpoint.
    recipe = get_recipe("interactive").with_overrides(network="fast+clicks+prev+instancenorm", image_size=32)
    back = model_from_checkpoint(make_checkpoint(net, recipe, "interactive"))
    assert back.config.norm == "instance" and not any(isinstance(m, torch.nn.BatchNorm2d) for m in back.modules())
    with pytest.raises(ValueError, match="unknown norm 'layer'"):
        build_network(network_config("fast").__class__(norm="layer"))
