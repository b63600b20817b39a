"""Class activation maps: where in the photo a single-backbone head sees its class.

The backbone's last convolutional feature map ``F`` (h, w, C), the layer that feeds its global
average pooling, times the head's Dense weights ``w`` (C,) gives ``cam = F @ w``; its mean over
positions plus the bias is the head's logit. The map is upsampled to the photo's size and overlaid.

The photo goes through the steps the head's features were made with, resolved as ``catfeat predict``
resolves them (:func:`catfeat.predict.feature_steps`, the weights recorded in ``head.json``): the same
decoder, weights, precision and TTA (a flip-TTA map is the mean of the photo's map and its mirror's,
turned back), so that the map's mean is the feature row the head was fitted on.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np


def _gap_layer(model):
    import keras

    for layer in reversed(model.layers):
        if isinstance(layer, keras.layers.GlobalAveragePooling2D):
            return layer
        if isinstance(layer, keras.Model):
            inner = _gap_layer(layer)
            if inner is not None:
                return inner
    return None


def conv_model(backbone, weights="imagenet", seed: int = 0, precision: str = "float32", tta: str = "none"):
    """Keras model: uint8 (size, size, 3) -> the last 4-D feature map (float32), the input of the
    backbone's GlobalAveragePooling2D (found by type, for any registry backbone). ``precision`` and
    ``tta`` as in :func:`catfeat.models.forward.feature_model`: with ``tta="flip"`` the map is the mean
    of the image's and of its mirror image's (turned back), whose mean over positions is the TTA feature."""
    import keras
    from keras import ops

    from catfeat.models.forward import TTA_MODES, dtype_policy, resolve_precision
    from catfeat.models.registry import build_backbone, get_backbone, preprocess

    if tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {', '.join(TTA_MODES)}, got {tta!r}")
    spec = get_backbone(backbone)
    with dtype_policy(resolve_precision(precision)):
        net = build_backbone(spec, weights, seed)
    gap = _gap_layer(net)
    if gap is None:
        raise ValueError(f"{spec.name} has no GlobalAveragePooling2D layer to take the feature map from")
    trunk = keras.Model(net.inputs, gap.input, name=f"{spec.name}_conv")
    inp = keras.Input((spec.input_size, spec.input_size, 3), dtype="uint8", name="image")
    x = preprocess(spec, ops.cast(inp, "float32"))
    out = ops.cast(trunk(x), "float32")
    if tta == "flip":
        out = (out + ops.flip(ops.cast(trunk(ops.flip(x, axis=2)), "float32"), axis=2)) / 2.0
    return keras.Model(inp, out, name=f"catfeat_{spec.name}_conv")


def head_weights(head, class_index: int | None = None) -> tuple[np.ndarray, float]:
    """``(w (C,), b)`` of a single-backbone FusedHead for one class. Two classes: the sigmoid unit
    scores class 1, so class 0 gets ``-w, -b``; default class 1."""
    kernel, bias = head.model_.get_layer("output").get_weights()
    if len(head.backbones_) != 1:
        raise ValueError(f"a CAM needs a head over one backbone; this one fuses {', '.join(head.backbones_)}")
    k = 1 if class_index is None else int(class_index)
    if kernel.shape[1] == 1:
        sign = 1.0 if k == 1 else -1.0
        return sign * kernel[:, 0].astype(np.float64), sign * float(bias[0])
    return kernel[:, k].astype(np.float64), float(bias[k])


def _upsample(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(cam.astype(np.float32), mode="F").resize(size, Image.BILINEAR), np.float32)


def _photo(path) -> "Image.Image":  # noqa: F821
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        return ImageOps.exif_transpose(im).convert("RGB")


def recorded_weights(head, name: str) -> tuple:
    """``(weights argument, seed)`` of the backbone ``name`` as ``head`` records them (``head.json``'s
    features record), or ``("imagenet", 0)`` for a head saved without that record."""
    from catfeat.models.weights import cache_weights

    ident = ((getattr(head, "feature_recipes_", None) or {}).get(name) or {}).get("weights")
    return cache_weights(ident) if ident else ("imagenet", 0)


class ActivationMapper:
    """Computes CAMs of photos for one backbone and a FusedHead trained on its features alone.

    The photo is decoded and the map computed as the head's features were made (decoder,
    precision, TTA: :func:`catfeat.predict.feature_steps`); ``weights`` (and ``seed``, default 0)
    override the recorded weights (:func:`recorded_weights`)."""

    def __init__(self, head, weights=None, seed: int | None = None, model=None):
        from catfeat.models.registry import get_backbone
        from catfeat.predict import feature_steps

        if len(head.backbones_) != 1:
            raise ValueError(f"a CAM needs a head over one backbone; this one fuses {', '.join(head.backbones_)}")
        self.head, self.spec = head, get_backbone(head.backbones_[0])
        self.step = feature_steps(head)[self.spec.name]
        if weights is None:
            weights, recorded_seed = recorded_weights(head, self.spec.name)
            seed = recorded_seed if seed is None else seed
        self.model = model or conv_model(self.spec, weights, seed or 0, self.step["precision"], self.step["tta"])

    def feature_map(self, path: str | os.PathLike) -> np.ndarray:
        """The backbone's last feature map (h, w, C) of one photo."""
        import keras

        from catfeat.images.decoders import decode_image

        x = decode_image(path, [self.spec.input_size], self.step["decoder"])[self.spec.input_size][None]
        return keras.ops.convert_to_numpy(self.model(x, training=False))[0].astype(np.float64)

    def __call__(self, path: str | os.PathLike, class_index: int | None = None,
                 full_size: bool = True) -> np.ndarray:
        """The CAM of ``class_index`` (default: the predicted class): (H, W) of the photo, or the
        feature map's (h, w) with ``full_size=False``."""
        fmap = self.feature_map(path)
        if class_index is None:
            logits = fmap.mean(axis=(0, 1)) @ self.head.model_.get_layer("output").get_weights()[0]
            class_index = int(logits[0] > 0) if logits.shape[0] == 1 else int(np.argmax(logits))
        w, _ = head_weights(self.head, class_index)
        cam = fmap @ w
        if not full_size:
            return cam
        return _upsample(cam, _photo(path).size)


def class_activation_map(path: str | os.PathLike, head, weights=None, class_index: int | None = None,
                         seed: int | None = None) -> np.ndarray:
    """The CAM of one photo, (H, W) float32 at the photo's size (see :class:`ActivationMapper`)."""
    return ActivationMapper(head, weights, seed)(path, class_index)


def overlay(photo: np.ndarray, cam: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blend a colour-mapped CAM (min-max scaled) over an RGB uint8 photo of the same size."""
    from matplotlib import colormaps

    if photo.shape[:2] != cam.shape:
        raise ValueError(f"photo {photo.shape[:2]} and CAM {cam.shape} differ in size")
    span = float(cam.max() - cam.min())
    norm = (cam - cam.min()) / span if span > 0 else np.zeros_like(cam)
    heat = colormaps[cmap](norm)[..., :3] * 255.0
    return np.clip((1 - alpha) * photo.astype(np.float64) + alpha * heat, 0, 255).astype(np.uint8)


def save_cam_grid(paths: Sequence[str | os.PathLike], head, out_png: str | os.PathLike, weights=None,
                  seed: int | None = None, cols: int = 4, thumb: int = 160, alpha: float = 0.5,
                  mapper: ActivationMapper | None = None) -> Path:
    """A PNG grid: each photo with its CAM overlaid, captioned with the predicted class and probability."""
    from PIL import Image, ImageDraw

    mapper = mapper or ActivationMapper(head, weights, seed)
    paths = list(paths)
    if not paths:
        raise ValueError("no images for the CAM grid")
    cols = max(1, min(cols, len(paths)))
    rows, pad = -(-len(paths) // cols), 14
    sheet = Image.new("RGB", (cols * thumb, rows * (thumb + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, p in enumerate(paths):
        fmap = mapper.feature_map(p)
        proba = head.predict_proba([fmap.mean(axis=(0, 1))[None].astype(np.float32)])[0]
        k = int(np.argmax(proba))
        w, _ = head_weights(head, k)
        photo = _photo(p)
        cam = _upsample(fmap @ w, photo.size)
        tile = Image.fromarray(overlay(np.asarray(photo), cam, alpha))
        tile.thumbnail((thumb, thumb))
        x, y = (i % cols) * thumb, (i // cols) * (thumb + pad)
        sheet.paste(tile, (x + (thumb - tile.width) // 2, y + (thumb - tile.height) // 2))
        draw.text((x + 2, y + thumb), f"{Path(p).name}: {head.classes_[k]} {proba[k]:.2f}"[: thumb // 6],
                  fill="black")
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
