"""convert / merge on timm models (random weights) and on hand-made models."""
import copy

import pytest
import timm
import torch
import torch.nn as nn

import taps_fast
from taps_fast import TAPSConv2d, TAPSLinear, convert, merge, taps_layers

MODELS = ["resnet50", "vit_base_patch16_224", "densenet121"]


@pytest.fixture(scope="module", params=MODELS)
def timm_pair(request):
    torch.manual_seed(0)
    plain = timm.create_model(request.param, pretrained=False).eval()
    model = convert(copy.deepcopy(plain))
    return request.param, plain, model


def test_timm_zero_delta_is_exact(timm_pair):
    name, plain, model = timm_pair
    layers = list(taps_layers(model))
    n_plain = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in plain.modules())
    assert len(layers) == n_plain - 1  # everything but the classifier head
    head = model.get_classifier()
    assert not isinstance(head, (TAPSLinear, TAPSConv2d)) and all(p.requires_grad for p in head.parameters())
    for lname, m in model.named_modules():
        if taps_fast.is_norm(m):
            assert all(p.requires_grad for p in m.parameters(recurse=False)), lname
    for n, p in model.named_parameters():
        if n.endswith(".weight") and isinstance(model.get_submodule(n.rpartition(".")[0]), (TAPSLinear, TAPSConv2d)):
            assert not p.requires_grad, n
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))


def test_timm_random_deltas_equal_hand_built(timm_pair):
    name, plain, model = timm_pair
    model = copy.deepcopy(model)
    hand = copy.deepcopy(plain)
    hand_mods = dict(hand.named_modules())
    g = torch.Generator().manual_seed(1)
    n_open = 0
    with torch.no_grad():
        for i, (lname, m) in enumerate(taps_layers(model)):
            m.delta.copy_(torch.randn(m.delta.shape, generator=g) * 0.02)
            score = 0.05 if i % 3 == 0 else (0.1 if i % 3 == 1 else 0.4)  # either side of τ, and at τ
            m.score.fill_(score)
            gate = 1.0 if score >= 0.1 else 0.0
            n_open += gate
            hand_mods[lname].weight.copy_(m.weight + gate * m.delta)
    assert 0 < n_open < len(list(taps_layers(model)))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        y = model(x)
        assert torch.equal(y, hand(x))
        assert torch.equal(merge(model)(x), y)


def test_merge_gives_plain_model_and_leaves_original():
    m = convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.Linear(5, 2)), head="3")
    with torch.no_grad():
        m[0].delta.normal_()
        m[2].delta.normal_()
        m[2].score.fill_(0.0)
    plain = merge(m)
    assert type(plain[0]) is nn.Conv2d and type(plain[2]) is nn.Linear
    assert isinstance(m[0], TAPSConv2d)
    x = torch.randn(2, 3, 8, 8)
    with taps_fast.use_backend("reference"):  # the same GEMMs as the merged layers: bit for bit
        assert torch.equal(plain(x), m(x))
    # default: 2 rows go to the compiled GEMV kernel ("cpp"), another summation order
    torch.testing.assert_close(plain(x), m(x), rtol=2e-5, atol=1e-6)
    assert torch.equal(plain[2].weight, m[2].weight)  # closed: W only


def test_include_exclude_and_head():
    model = timm.create_model("resnet18", pretrained=False)
    with pytest.raises(ValueError, match="matches only the classifier head"):
        convert(timm.create_model("resnet18", pretrained=False), include="fc")
    convert(model, include=["layer4.*"], exclude="layer4.0.downsample.*")
    names = [n for n, _ in taps_layers(model)]
    assert names and all(n.startswith("layer4.") for n in names)
    assert "layer4.0.downsample.0" not in names and "fc" not in names  # the head is never wrapped
    assert not model.conv1.weight.requires_grad and not model.layer1[0].conv1.weight.requires_grad
    assert model.fc.weight.requires_grad and model.bn1.weight.requires_grad


def test_bad_patterns_and_nothing_to_convert():
    with pytest.raises(ValueError, match="include pattern 'nope.*' matched no"):
        convert(timm.create_model("resnet18", pretrained=False), include="nope.*")
    with pytest.raises(ValueError, match="found no nn.Linear or nn.Conv2d"):
        convert(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))
    with pytest.raises(ValueError, match="head 'fc2' is not a module"):
        convert(nn.Sequential(nn.Linear(2, 2)), head="fc2")


def test_skips_layers_whose_forward_bypasses_the_weight(caplog):
    from timm.layers import StdConv2d

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.std = StdConv2d(3, 4, 3)
            self.attn = nn.MultiheadAttention(8, 2)
            self.lin = nn.Linear(8, 8)

    m = M()
    with caplog.at_level("WARNING", logger="taps_fast"):
        convert(m, head=None)
    assert isinstance(m.lin, TAPSLinear) and isinstance(m.attn.out_proj, nn.Linear)
    assert not isinstance(m.attn.out_proj, TAPSLinear) and not isinstance(m.std, TAPSConv2d)
    assert "attn.out_proj" in caplog.text and "std" in caplog.text


def test_shared_module_replaced_everywhere_and_bare_layer():
    shared = nn.Linear(4, 4)
    m = nn.Sequential(shared, nn.ReLU(), shared)
    convert(m, head=None)
    assert m[0] is m[2] and isinstance(m[0], TAPSLinear)
    bare = convert(nn.Conv2d(1, 2, 3))
    assert isinstance(bare, TAPSConv2d)


def test_other_parameters_frozen_vit():
    model = convert(timm.create_model("vit_tiny_patch16_224", pretrained=False))
    assert not model.pos_embed.requires_grad and not model.cls_token.requires_grad
    assert not model.blocks[0].attn.qkv.bias.requires_grad  # gated layers' biases are base
    assert model.blocks[0].attn.qkv.delta.requires_grad and model.blocks[0].attn.qkv.score.requires_grad
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith((".delta", ".score")) or "norm" in n or n.startswith("head.") for n in trainable)


def test_convert_twice_is_idempotent():
    m = convert(timm.create_model("resnet18", pretrained=False))
    n = len(list(taps_layers(m)))
    convert(m)
    assert len(list(taps_layers(m))) == n


TINY = [m for m in timm.list_models("test_*")]


@pytest.mark.parametrize("name", TINY)
def test_any_timm_model(name):
    """Every small timm test model (CNNs, ViTs, hybrids): exact while the deltas are zero, and
    trainable end to end (scores and open deltas get gradients; the base none)."""
    torch.manual_seed(0)
    plain = timm.create_model(name, pretrained=False).eval()
    model = convert(copy.deepcopy(plain))
    size = plain.pretrained_cfg.get("input_size", (3, 160, 160))
    x = torch.randn(2, *size)
    with torch.no_grad():
        with taps_fast.use_backend("reference"):  # the same GEMMs as the plain model: bit for bit
            assert torch.equal(model(x), plain(x))
        # default: layers seeing few rows run on the compiled GEMV kernel ("cpp"), whose
        # summation order differs from MKL's
        torch.testing.assert_close(model(x), plain(x), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        for _, m in taps_layers(model):
            m.delta.normal_(0, 1e-3)
    model.train()
    (model(x).square().mean() + taps_fast.sparsity_penalty(model, 0.5)).backward()
    for lname, m in taps_layers(model):
        assert m.score.grad is not None and m.delta.grad is not None, lname
        assert m.weight.grad is None, lname


@pytest.mark.parametrize("name", ["test_resnet", "test_vit"])
def test_compile_fullgraph_converted_timm(name):
    torch.manual_seed(0)
    model = convert(timm.create_model(name, pretrained=False)).eval()
    with torch.no_grad():
        for i, (_, m) in enumerate(taps_layers(model)):
            m.delta.normal_(0, 1e-2)
            m.score.fill_(0.05 if i % 2 else 0.2)
    x = torch.randn(2, *model.pretrained_cfg["input_size"])
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    y_eager = model(x)
    y_eager.sum().backward()
    assert torch.allclose(y, y_eager, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        if n in grads:
            assert torch.allclose(grads[n], p.grad, rtol=1e-4, atol=1e-6), n
