"""Pre- and post-processing of the server: image bytes -> the base's input tensor, and a batch's
logits -> each request's top-k.

Pre-processing is the base model's own evaluation transform, from timm's data config
(``timm.data.resolve_data_config`` + ``create_transform``: resize, centre crop, normalise), on
an image decoded by PIL and converted to RGB. It runs in the server's thread pool, never on the
event loop.
"""
from __future__ import annotations

import io
import warnings
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from .errors import BadRequest

# PIL's own guard against decompression bombs warns at 89M pixels and fails at twice that; the
# server fails at the warning's size (a 9500 x 9500 photo), before decoding.
MAX_IMAGE_PIXELS = 89_478_485


class Preprocessor:
    """The base model's evaluation transform (timm data config) applied to encoded images.

    ``data_config``: timm's data config (input_size, interpolation, mean, std, crop_pct,
    crop_mode); by default resolved from ``model`` (its pretrained_cfg) as timm's own scripts do.
    """

    def __init__(self, model: Optional[nn.Module] = None, data_config: Optional[Dict] = None) -> None:
        from timm.data import create_transform, resolve_data_config

        if data_config is None:
            if model is None:
                raise ValueError("Preprocessor: give the base model or its timm data config")
            data_config = resolve_data_config({}, model=model)
        self.data_config = dict(data_config)
        self.transform = create_transform(**self.data_config, is_training=False)
        self.input_size = tuple(self.data_config["input_size"])

    def decode(self, data: bytes):
        """Encoded image bytes -> an RGB PIL image; BadRequest naming the problem otherwise."""
        from PIL import Image, UnidentifiedImageError

        if not data:
            raise BadRequest("the request has no image: the body (or its image field) is empty")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    raise BadRequest(f"the image is {img.width} x {img.height} pixels; the server takes "
                                     f"at most {MAX_IMAGE_PIXELS} pixels")
                img.load()
        except BadRequest:
            raise
        except UnidentifiedImageError:
            raise BadRequest(f"the body is not an image PIL can decode ({len(data)} bytes, starting "
                             f"{data[:8]!r})") from None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning,
                Image.DecompressionBombError) as e:
            raise BadRequest(f"the image could not be decoded (truncated or corrupt): {e}") from None
        return img.convert("RGB")

    def __call__(self, data: bytes) -> Tensor:
        """Encoded image bytes -> the model's input, [C, H, W] float32."""
        return self.transform(self.decode(data))


def top_k(logits: Tensor, sizes: Sequence[int], ks: Sequence[int],
          labels: Sequence[Optional[List[str]]], with_logits: Sequence[bool]) -> List[Dict]:
    """Each row's top-k over its task's own classes: ``logits`` [B, C_max] (-inf past a row's
    size, as MultiTaskModel pads), ``sizes[i]`` row i's class count, ``ks[i]`` its k. Softmax
    and top-k run once on the whole batch (float32); a row keeps its first min(k, size)."""
    probs = torch.softmax(logits.float(), dim=-1)
    kmax = max(min(k, s) for k, s in zip(ks, sizes)) if len(ks) else 0
    vals, idx = probs.topk(kmax, dim=-1) if kmax else (probs[:, :0], probs[:, :0].long())
    vals, idx = vals.tolist(), idx.tolist()
    out = []
    for i, (k, size) in enumerate(zip(ks, sizes)):
        names = labels[i]
        n = min(k, size)
        preds = []
        for j in range(n):
            p = {"index": idx[i][j], "prob": vals[i][j]}
            if names is not None:
                p["label"] = names[idx[i][j]]
            preds.append(p)
        row = {"top_k": preds}
        if with_logits[i]:
            row["logits"] = logits[i, :size].float().tolist()
        out.append(row)
    return out
