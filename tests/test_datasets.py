"""The packaged data sets as ImageFolder trees."""
import os

import numpy as np
import pytest
from PIL import Image

from taps_fast.datasets import textures, write_imagefolder

pytest.importorskip("skimage")


def _count(root):
    return {c: len(os.listdir(os.path.join(root, c))) for c in sorted(os.listdir(root))}


def test_trees(tmp_path):
    d = write_imagefolder(str(tmp_path), "digits")
    tr, va = _count(os.path.join(d, "train")), _count(os.path.join(d, "val"))
    assert list(tr) == [str(i) for i in range(10)] and sum(tr.values()) == 1257 and sum(va.values()) == 540
    f = write_imagefolder(str(tmp_path), "faces", max_per_class=5)
    assert _count(os.path.join(f, "train")) == {"face": 5, "non_face": 5}
    im = Image.open(os.path.join(f, "val", "face", "00000.png"))
    assert im.size == (25, 25)
    with pytest.raises(ValueError, match="unknown data set 'cifar'"):
        write_imagefolder(str(tmp_path), "cifar")


def test_texture_splits_share_no_pixels():
    train, val = textures()
    assert sorted(train) == ["brick", "grass", "gravel", "moon"]
    for c in train:
        assert len(train[c]) == 135 and len(val[c]) == 60  # 15 rows × 9 / × 4 columns of 64-px patches
        tr = {p.tobytes() for p in train[c]}
        assert not any(p.tobytes() in tr for p in val[c])
        assert all(p.shape == (64, 64) and p.dtype == np.uint8 for p in val[c])
