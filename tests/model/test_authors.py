"""import_authors_checkpoint: a checkpoint in the layout the TAPS authors' code writes
(github MattWallingford/TAPS: models/taps_net.py freeze_conv, train_sequential.py's torch.save)
imported into a converted torchvision resnet18, exactly, and every refusal."""
import argparse
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import RTOL_MODEL, assert_rel_close, rel_err
from taps_fast import (AuthorsCheckpointError, base_fingerprint, convert, convert_authors_checkpoint,
                       import_authors_checkpoint, load_task, taps_layers)

tv = pytest.importorskip("torchvision")

NUM_CLASSES = 5
F32_TAU = torch.tensor(0.1)                                  # float32(0.1): open under >=
BELOW_TAU = torch.nextafter(F32_TAU, torch.tensor(0.0))      # the float32 just below: closed
# Scores cycled over the 20 convs: the init 0.15, both sides of τ to the last bit, negatives
# (the L1 penalty pushes scores through zero), large ones.
SCORES = [0.15, 0.02, float(F32_TAU), float(BELOW_TAU), -0.01, 0.4, 0.099, 0.1001]


class AuthorsConv(nn.Conv2d):
    """The authors' freeze_conv: an nn.Conv2d with `residual` (ΔW) and `indicator` (shape [1])
    registered after its weight; computes conv2d(x, W + 1[indicator >= τ]·ΔW)."""

    tau = 0.1

    def forward(self, x):
        w = self.weight + (self.indicator >= self.tau).to(self.weight.dtype) * self.residual
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def base(seed=0, arch="resnet18", num_classes=NUM_CLASSES):
    torch.manual_seed(seed)
    return getattr(tv.models, arch)(num_classes=num_classes)


def authors_model(seed=0):
    """The authors' ResNet-18 after a run: same base as base(seed), every conv with a residual and
    an indicator, BatchNorm (parameters and running stats) and fc trained."""
    m = base(seed)
    g = torch.Generator().manual_seed(123)
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    for i, mod in enumerate(convs):
        mod.__class__ = AuthorsConv
        mod.register_parameter("residual", nn.Parameter(torch.randn(mod.weight.shape, generator=g) * 0.02))
        mod.register_parameter("indicator", nn.Parameter(torch.tensor([SCORES[i % len(SCORES)]])))
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.copy_(1 + 0.1 * torch.randn(mod.weight.shape, generator=g))
                mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=g))
                mod.running_mean.copy_(0.1 * torch.randn(mod.running_mean.shape, generator=g))
                mod.running_var.copy_(0.5 + torch.rand(mod.running_var.shape, generator=g))
                mod.num_batches_tracked.fill_(1234)
        m.fc.weight.copy_(torch.randn(m.fc.weight.shape, generator=g) * 0.05)
        m.fc.bias.copy_(torch.randn(m.fc.bias.shape, generator=g))
    return m.eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("authors")
    am = authors_model()
    sd = am.state_dict()
    files = {  # train_sequential.py; fine_tune_freeze_pb.py under nn.DataParallel
        "wrapped": {"arch": "resnet50", "epoch": 7, "state_dict": sd},
        "dataparallel": {"arch": "resnet50", "epoch": 7, "state_dict": {"module." + k: v for k, v in sd.items()}},
    }
    paths = {}
    for name, obj in files.items():
        paths[name] = d / f"{name}.pth"
        torch.save(obj, paths[name])
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref = copy.deepcopy(am).double()(x.double())  # the authors' forward, in float64
    return {"sd": {k: v.clone() for k, v in sd.items()}, "paths": paths, "x": x, "ref": ref}


def converted(seed=0, **kw):
    return convert(base(seed, **kw), head="fc").eval()


def test_layout_is_the_authors(ckpt):
    """The synthetic file has their key layout: weight, residual, indicator per conv, no bias."""
    keys = list(ckpt["sd"])
    i = keys.index("layer1.0.conv1.weight")
    assert keys[i:i + 3] == ["layer1.0.conv1.weight", "layer1.0.conv1.residual", "layer1.0.conv1.indicator"]
    assert "conv1.bias" not in keys and "layer2.0.downsample.0.residual" in keys
    assert ckpt["sd"]["conv1.indicator"].shape == (1,)
    assert sum(k.endswith(".indicator") for k in keys) == 20


def state_keys(sd):
    """The authors' BatchNorm and fc keys: everything but the convs' weight/residual/indicator."""
    convs = {k.rpartition(".")[0] for k in sd if k.endswith(".residual")}
    return [k for k in sd if k.rpartition(".")[0] not in convs]


def assert_exact(model, sd, rep):
    """Every delta, score, norm, head (and base) tensor equals the checkpoint's, bit for bit."""
    want_open = [n for n, _ in taps_layers(model) if bool(sd[f"{n}.indicator"] >= 0.1)]
    assert rep.layers == 20 and rep.open == want_open and len(rep.closed) == 20 - len(want_open)
    assert rep.base == "checked" and rep.threshold == 0.1 and rep.state == len(state_keys(sd))
    state = model.state_dict()
    for n, layer in taps_layers(model):
        assert torch.equal(layer.delta, sd[f"{n}.residual"]), n
        assert layer.score.shape == () and torch.equal(layer.score.reshape(1), sd[f"{n}.indicator"]), n
        assert torch.equal(layer.weight, sd[f"{n}.weight"]), n
        assert layer.threshold == 0.1 and layer.is_open == (n in rep.open)
    for k in state_keys(sd):
        assert torch.equal(state[k], sd[k]), k


def test_import_is_exact_and_computes_the_authors_model(ckpt):
    sd, x, ref = ckpt["sd"], ckpt["x"], ckpt["ref"]
    model = converted()
    with torch.no_grad():
        plain = model(x)
    rep = import_authors_checkpoint(ckpt["paths"]["wrapped"], model)
    assert_exact(model, sd, rep)
    assert rep.meta == {"arch": "resnet50", "epoch": 7}
    # float32(0.1) is open under >= (as theirs), the float32 just below it closed
    assert torch.equal(sd["layer1.0.conv2.indicator"], F32_TAU.reshape(1)) and "layer1.0.conv2" in rep.open
    assert torch.equal(sd["layer1.1.conv1.indicator"], BELOW_TAU.reshape(1)) and "layer1.1.conv1" in rep.closed
    with torch.no_grad():
        out = model(x)
        assert rel_err(plain, ref) > 1e-2  # the import changes the output: the check below can fail
        assert_rel_close(out, ref, torch.float32, "imported fp32 vs authors fp64", RTOL_MODEL)
        assert_rel_close(model.double()(x.double()), ref, torch.float64, "imported fp64 vs authors fp64",
                         RTOL_MODEL)


@pytest.mark.parametrize("kind", ["dataparallel", "bare"])
def test_dataparallel_prefix_and_bare_state_dict(ckpt, kind):
    """fine_tune_freeze_pb.py's "module."-prefixed file; a bare state dict, passed in memory."""
    src = ckpt["paths"]["dataparallel"] if kind == "dataparallel" else ckpt["sd"]
    model = converted()
    rep = import_authors_checkpoint(src, model)
    assert_exact(model, ckpt["sd"], rep)
    assert rep.meta == ({"arch": "resnet50", "epoch": 7} if kind == "dataparallel" else {})


def test_task_file_round_trip(ckpt, tmp_path):
    model = converted()
    dst = tmp_path / "task.safetensors"
    rep = convert_authors_checkpoint(ckpt["paths"]["wrapped"], dst, model)
    assert rep.task_bytes == dst.stat().st_size
    fresh = load_task(converted(), dst)
    with torch.no_grad():
        out, ref = fresh(ckpt["x"]), model(ckpt["x"])
    assert torch.equal(out, ref)
    assert_rel_close(out, ckpt["ref"], torch.float32, "task file vs authors fp64", RTOL_MODEL)
    for (n, a), (_, b) in zip(taps_layers(fresh), taps_layers(model)):
        assert torch.equal(a.score, b.score) and a.threshold == b.threshold == 0.1
        if n in rep.open:
            assert torch.equal(a.delta, b.delta), n


def test_threshold_argument(ckpt):
    sd = ckpt["sd"]
    model = converted()
    rep = import_authors_checkpoint(ckpt["paths"]["wrapped"], model, threshold=0.2)
    assert rep.open == [n for n, _ in taps_layers(model) if float(sd[f"{n}.indicator"]) >= 0.2]
    assert all(layer.threshold == 0.2 for _, layer in taps_layers(model))


def test_strict_false_skips_missing_and_unknown_keys(ckpt):
    sd = dict(ckpt["sd"])
    del sd["layer2.1.bn1.running_var"]
    sd["layer2.1.bn1.frozen_mean"] = torch.zeros(128)
    with pytest.raises(AuthorsCheckpointError, match=r"missing keys \['layer2.1.bn1.running_var'\]; "
                                                     r"unexpected keys \['layer2.1.bn1.frozen_mean'\]"):
        import_authors_checkpoint(sd, converted())
    model = converted()
    before = model.layer2[1].bn1.running_var.clone()
    rep = import_authors_checkpoint(sd, model, strict=False)
    assert rep.missing == ["layer2.1.bn1.running_var"] and rep.ignored == ["layer2.1.bn1.frozen_mean"]
    assert torch.equal(model.layer2[1].bn1.running_var, before)
    assert torch.equal(model.layer2[1].bn1.running_mean, sd["layer2.1.bn1.running_mean"])


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def unchanged(model, snap):
    return all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


def test_wrong_architecture(ckpt):
    model = convert(base(arch="resnet50"), head="fc")
    with pytest.raises(AuthorsCheckpointError, match=r"architecture mismatch: the checkpoint gates 20 "
                                                     r"layers, the model 53.*layer1.0.conv3.*'arch' field"):
        import_authors_checkpoint(ckpt["paths"]["wrapped"], model)


def test_head_not_excluded_and_num_classes(ckpt):
    with pytest.raises(AuthorsCheckpointError, match=r"\['fc'\] are plain layers.*head='fc'"):
        import_authors_checkpoint(ckpt["paths"]["wrapped"], convert(base()))
    with pytest.raises(AuthorsCheckpointError, match=r"fc.weight has shape \(5, 512\) in the checkpoint, "
                                                     r"\(7, 512\) in the model \(build the model with"):
        import_authors_checkpoint(ckpt["paths"]["wrapped"], converted(num_classes=7))


def test_missing_key_leaves_model_untouched(ckpt, tmp_path):
    sd = dict(ckpt["sd"])
    del sd["layer3.1.conv2.residual"]
    path = tmp_path / "missing.pth"
    torch.save({"state_dict": sd}, path)
    model = converted()
    snap = snapshot(model)
    with pytest.raises(AuthorsCheckpointError, match=r"missing keys \['layer3.1.conv2.residual'\]"):
        import_authors_checkpoint(path, model)
    assert unchanged(model, snap)


def test_other_base_is_refused_or_loaded(ckpt):
    other = converted(seed=1)
    fp, snap = base_fingerprint(other), snapshot(other)
    with pytest.raises(AuthorsCheckpointError, match=r"another base.*20 base tensors differ.*conv1.weight"):
        import_authors_checkpoint(ckpt["paths"]["wrapped"], other)
    assert unchanged(other, snap)  # the last check before any write
    rep = import_authors_checkpoint(ckpt["paths"]["wrapped"], other, base="load")
    assert rep.base == "loaded" and base_fingerprint(other) == base_fingerprint(converted(seed=0)) != fp


def test_unreadable_files(ckpt, tmp_path):
    model = converted()  # every refusal below comes before the model is touched
    data = ckpt["paths"]["wrapped"].read_bytes()
    trunc = tmp_path / "trunc.pth"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(AuthorsCheckpointError, match=r"trunc.pth' is corrupt or not a torch.save file"):
        import_authors_checkpoint(trunc, model)

    # A checkpoint that also pickled, e.g., the run's argparse options: weights_only refuses it.
    ns = tmp_path / "ns.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "args": argparse.Namespace(lr=0.01)}, ns)
    with pytest.raises(AuthorsCheckpointError, match=r"needs pickle beyond tensors.*argparse.Namespace.*"
                                                     r"weights_only=True\), which cannot run code"):
        import_authors_checkpoint(ns, model)

    with pytest.raises(FileNotFoundError, match="does not exist"):
        import_authors_checkpoint(tmp_path / "nope.pth", model)


def test_not_a_taps_checkpoint_or_model(ckpt):
    with pytest.raises(AuthorsCheckpointError, match=r"no '<conv>.residual' / '<conv>.indicator' keys"):
        import_authors_checkpoint(base().state_dict(), converted())
    with pytest.raises(ValueError, match=r"has no TAPS layers; convert it first"):
        import_authors_checkpoint(ckpt["paths"]["wrapped"], base())
