"""ImageFolder checks (each bad tree refused with a message naming the problem), the unreadable
image policy (skipped with a warning), and the sampler's run-layout independence."""
import logging
import os
import shutil

import pytest

from taps_fast.train import data as D

from train_helpers import TINY_BN, tiny_data, train


@pytest.fixture
def tree(tmp_path):
    return tiny_data(tmp_path / "data", "faces", per_class=3)


def test_good_tree(tree):
    tr, va = D.scan(tree)
    assert tr.classes == va.classes == ["face", "non_face"]
    assert len(tr.samples) == len(va.samples) == 6 and not tr.skipped


def test_missing_split(tree):
    shutil.rmtree(os.path.join(tree, "val"))
    with pytest.raises(D.DataError, match=r"no 'val' split folder \(it has: \['train'\]\)"):
        D.scan(tree)
    with pytest.raises(D.DataError, match="does not exist"):
        D.scan(tree + "_nowhere")


def test_empty_class(tree):
    os.makedirs(os.path.join(tree, "train", "empty"))
    with pytest.raises(D.DataError, match=r"class folder .*train/empty' has no readable image"):
        D.scan(tree)


def test_class_mismatch(tree):
    os.rename(os.path.join(tree, "val", "non_face"), os.path.join(tree, "val", "nonface"))
    with pytest.raises(D.DataError, match=r"different classes \(only in train: \['non_face'\], only in val: "
                                          r"\['nonface'\]\)"):
        D.scan(tree)


def test_unreadable_image_skipped_with_a_warning(tree, caplog):
    bad = os.path.join(tree, "train", "face", "broken.png")
    with open(bad, "wb") as f:
        f.write(b"not a png at all")
    with open(os.path.join(tree, "train", "face", "notes.txt"), "w") as f:
        f.write("not an image: ignored without a warning")
    with caplog.at_level(logging.WARNING, logger="taps_fast.train.data"):
        tr, _ = D.scan(tree)
    assert tr.skipped == [bad] and len(tr.samples) == 6
    assert "skipped 1 unreadable image(s)" in caplog.text and "broken.png" in caplog.text
    # a class whose every image is unreadable is refused
    for f in os.listdir(os.path.join(tree, "val", "face")):
        with open(os.path.join(tree, "val", "face", f), "wb") as fh:
            fh.write(b"junk")
    with pytest.raises(D.DataError, match="val/face' has no readable image"):
        D.scan(tree)


def test_command_reports_bad_data(tree, tmp_path, capsys):
    shutil.rmtree(os.path.join(tree, "train"))
    assert train("--data", tree, "--model", TINY_BN, "--epochs", 1, "--output", tmp_path / "o") == 2
    assert "no 'train' split folder" in capsys.readouterr().err


@pytest.mark.parametrize("world", [1, 2, 4])
def test_global_batches_do_not_depend_on_the_process_count(world):
    one = D.GlobalBatches(37, 8, seed=5)
    one.epoch = 3
    parts = [D.GlobalBatches(37, 8, seed=5, rank=r, world=world) for r in range(world)]
    for p in parts:
        p.epoch = 3
    joined = [sum(bs, []) for bs in zip(*[list(p) for p in parts])]
    assert joined == list(one) and len(joined) == 4  # 37 // 8, the partial batch dropped
    other = D.GlobalBatches(37, 8, seed=5)
    other.epoch = 4
    assert list(other) != list(one)  # each epoch its own order
    with pytest.raises(ValueError, match="multiple of the 3 processes"):
        D.GlobalBatches(37, 8, seed=5, world=3)
