"""Image-classification data sets that ship inside installed packages, written as ImageFolder
trees (``OUT/<name>/{train,val}/<class>/*.png``) for ``taps-fast train``; nothing is downloaded.

- ``digits``: scikit-learn's handwritten digits, 1,797 8×8 grey images, 10 classes, a stratified
  70/30 split (seed 0).
- ``faces``: scikit-image's ``lfw_subset``, 200 25×25 grey crops, 100 faces (Labeled Faces in the
  Wild) and 100 non-face patches, a stratified 70/30 split.
- ``textures``: 64×64 patches of scikit-image's brick, grass, gravel and moon-surface images (4
  classes); training patches from the left two thirds of each image, validation patches from the
  right third, so no pixel is in both splits.

``python -m taps_fast.datasets OUT [--only digits,faces] [--max-per-class N]``
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

log = logging.getLogger(__name__)

Split = Dict[str, List[np.ndarray]]  # class -> uint8 images


def _skimage_data(name: str) -> str:
    spec = importlib.util.find_spec("skimage")
    if spec is None:
        raise RuntimeError("the faces and textures data sets ship inside scikit-image: pip install scikit-image")
    return os.path.join(spec.submodule_search_locations[0], "data", name)


def _stratified(images: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> Tuple[Split, Split]:
    from sklearn.model_selection import train_test_split

    tr_x, va_x, tr_y, va_y = train_test_split(images, labels, test_size=0.3, random_state=0, stratify=labels)
    return ({n: [x for x, y in zip(tr_x, tr_y) if y == c] for c, n in enumerate(names)},
            {n: [x for x, y in zip(va_x, va_y) if y == c] for c, n in enumerate(names)})


def digits() -> Tuple[Split, Split]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images * (255.0 / 16.0)).round().astype(np.uint8)
    return _stratified(images, d.target, [str(i) for i in range(10)])


def faces() -> Tuple[Split, Split]:
    x = np.load(_skimage_data("lfw_subset.npy"), allow_pickle=False)  # [200, 25, 25] floats in [0, 1]
    images = (x * 255.0).round().clip(0, 255).astype(np.uint8)
    labels = np.array([0] * 100 + [1] * 100)
    return _stratified(images, labels, ["face", "non_face"])


def textures(patch: int = 64, stride: int = 32) -> Tuple[Split, Split]:
    from PIL import Image

    train: Split = {}
    val: Split = {}
    for name in ("brick", "grass", "gravel", "moon"):
        img = np.asarray(Image.open(_skimage_data(f"{name}.png")).convert("L"))
        h, w = img.shape
        cut = (2 * w) // 3

        def patches(x0: int, x1: int) -> List[np.ndarray]:
            return [img[y:y + patch, x:x + patch] for y in range(0, h - patch + 1, stride)
                    for x in range(x0, x1 - patch + 1, stride)]

        train[name], val[name] = patches(0, cut), patches(cut, w)
    return train, val


BUILDERS: Dict[str, Callable[[], Tuple[Split, Split]]] = {"digits": digits, "faces": faces, "textures": textures}


def write_imagefolder(root: str, name: str, max_per_class: Optional[int] = None) -> str:
    """Write data set ``name`` under ``root/name`` (train/ and val/); returns that folder."""
    from PIL import Image

    if name not in BUILDERS:
        raise ValueError(f"unknown data set {name!r}; known: {sorted(BUILDERS)}")
    out = os.path.join(root, name)
    for split, data in zip(("train", "val"), BUILDERS[name]()):
        for cls, images in data.items():
            d = os.path.join(out, split, cls)
            os.makedirs(d, exist_ok=True)
            for i, im in enumerate(images[:max_per_class]):
                Image.fromarray(im).save(os.path.join(d, f"{i:05d}.png"))
    log.info("wrote %s", out)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m taps_fast.datasets", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="folder to write the data sets into")
    p.add_argument("--only", default=",".join(BUILDERS), help="comma-separated names (default: all)")
    p.add_argument("--max-per-class", type=int, default=None, help="keep at most N images per class and split")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in a.only.split(","):
        print(write_imagefolder(a.out, name.strip(), a.max_per_class))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
