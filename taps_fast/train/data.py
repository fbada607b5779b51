"""ImageFolder data for ``taps-fast train``: checked before the first step, augmented with timm's
transforms, and sampled so that a run does not depend on how it is cut up.

Layout: ``DIR/<train split>/<class>/<image>`` and ``DIR/<val split>/<class>/<image>``; every class
needs at least one readable image in each split and both splits must list the same classes.

Unreadable images are *skipped with a warning*: every file with an image extension is opened
(PIL reads the header only) while indexing; one that PIL cannot identify is left out and named in
one warning per split, so a stray corrupt file does not kill a long run. A class left with no
readable image is refused.

Determinism: sample ``i`` of epoch ``e`` is augmented with RNGs seeded from (seed, e, i) alone, and
epoch ``e``'s order is a permutation seeded from (seed, e). So a resumed run and a run on W
processes (each taking its slice of every global batch) see exactly the batches of one
uninterrupted single-process run.
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class DataError(ValueError):
    """The data folder is not a usable ImageFolder tree (the message says what and where)."""


@dataclass
class ImageList:
    root: str
    classes: List[str]
    samples: List[Tuple[str, int]]  # (path, class index)
    skipped: List[str]


def scan_split(root: str, split: str) -> ImageList:
    d = os.path.join(root, split)
    if not os.path.isdir(root):
        raise DataError(f"data folder {root!r} does not exist")
    if not os.path.isdir(d):
        have = sorted(e for e in os.listdir(root) if os.path.isdir(os.path.join(root, e)))
        raise DataError(f"data folder {root!r} has no {split!r} split folder (it has: {have or 'no folders'}); "
                        "expected DIR/<split>/<class>/<image>")
    classes = sorted(e for e in os.listdir(d) if os.path.isdir(os.path.join(d, e)))
    if not classes:
        raise DataError(f"{d!r} has no class folders; expected {d}/<class>/<image>")
    from PIL import Image, UnidentifiedImageError

    samples: List[Tuple[str, int]] = []
    skipped: List[str] = []
    for c, name in enumerate(classes):
        n_before = len(samples)
        for dirpath, _, files in sorted(os.walk(os.path.join(d, name), followlinks=True)):
            for f in sorted(files):
                if not f.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                path = os.path.join(dirpath, f)
                try:
                    with Image.open(path) as im:
                        im.size  # noqa: B018 - the header parse is the check
                except (UnidentifiedImageError, OSError, ValueError):
                    skipped.append(path)
                    continue
                samples.append((path, c))
        if len(samples) == n_before:
            raise DataError(f"class folder {os.path.join(d, name)!r} has no readable image "
                            f"({', '.join(IMAGE_EXTENSIONS)})")
    if skipped:
        log.warning("%s: skipped %d unreadable image(s): %s%s", d, len(skipped), ", ".join(skipped[:5]),
                    " …" if len(skipped) > 5 else "")
    return ImageList(root, classes, samples, skipped)


def scan(root: str, train_split: str = "train", val_split: str = "val") -> Tuple[ImageList, ImageList]:
    """Both splits of ``root``, checked (DataError names the first problem)."""
    train, val = scan_split(root, train_split), scan_split(root, val_split)
    if train.classes != val.classes:
        only_t = sorted(set(train.classes) - set(val.classes))
        only_v = sorted(set(val.classes) - set(train.classes))
        raise DataError(f"{root!r}: the {train_split!r} and {val_split!r} splits have different classes "
                        f"(only in {train_split}: {only_t}, only in {val_split}: {only_v})")
    return train, val


def _seed_of(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + index) % (2 ** 63)


class ImageDataset(torch.utils.data.Dataset):
    """(image tensor, class, task) per sample; ``epoch`` (set by the loop) seeds the augmentation."""

    def __init__(self, images: ImageList, transform: Callable, task: int = 0, seed: int = 0) -> None:
        self.images, self.transform, self.task, self.seed, self.epoch = images, transform, task, seed, 0

    def __len__(self) -> int:
        return len(self.images.samples)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.images.samples[i]
        s = _seed_of(self.seed, self.epoch, i + (self.task << 40))
        random.seed(s)  # timm's RandomResizedCropAndInterpolation draws from `random`
        torch.manual_seed(s)  # torchvision's transforms draw from torch's RNG
        try:
            with Image.open(path) as im:
                x = self.transform(im.convert("RGB"))
        except OSError as e:  # readable header, broken pixels
            raise DataError(f"cannot decode image {path!r}: {e}") from e
        return x, label, self.task


class GlobalBatches(torch.utils.data.Sampler):
    """Epoch ``e``: a permutation of all samples seeded from (seed, e), cut into global batches of
    ``batch_size`` (the last partial one dropped when ``drop_last``); this process yields its
    ``rank``-th of ``world`` slices of each batch. Concatenating the samples of several tasks'
    datasets and permuting them mixes the tasks in every batch in proportion to their sizes."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 shuffle: bool = True, drop_last: bool = True) -> None:
        if batch_size % world:
            raise ValueError(f"the batch size {batch_size} must be a multiple of the {world} processes")
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.shuffle, self.drop_last, self.epoch = shuffle, drop_last, 0

    def global_batches(self) -> List[List[int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        out = [order[i:i + self.batch_size] for i in range(0, self.n, self.batch_size)]
        if self.drop_last and out and len(out[-1]) < self.batch_size:
            out.pop()
        return out

    def __iter__(self):
        for b in self.global_batches():
            per = -(-len(b) // self.world)
            mine = b[self.rank * per:(self.rank + 1) * per]
            if mine:  # a short last evaluation batch may leave a rank nothing
                yield mine

    def __len__(self) -> int:
        return len(self.global_batches())


def transforms(model: torch.nn.Module, img_size: Optional[int], augment: bool, hflip: float,
               scale: Sequence[float], color_jitter: float):
    """timm's (train, eval) transforms from the model's data config, at ``img_size`` when given."""
    from timm.data import create_transform, resolve_data_config

    cfg = resolve_data_config({}, model=model)
    if img_size:
        cfg["input_size"] = (3, img_size, img_size)
        cfg["crop_pct"] = 1.0  # small images: resize to the size itself, no centre crop
    eval_tf = create_transform(**cfg, is_training=False)
    train_tf = (create_transform(**cfg, is_training=True, hflip=hflip, scale=tuple(scale),
                                 color_jitter=color_jitter) if augment else eval_tf)
    return train_tf, eval_tf, cfg


def collate(batch) -> Tuple[Tensor, Tensor, Tensor]:
    xs, ys, ts = zip(*batch)
    return torch.stack(xs), torch.tensor(ys), torch.tensor(ts)
