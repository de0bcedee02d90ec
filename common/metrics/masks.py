"""Mask agreement for layout-conditioned generation: does the generated image follow the input mask?

A *parser* (any callable ``PIL image -> int mask [H, W]``) turns each generated image into a class-id mask, which
is compared with the mask the model was conditioned on: pixel accuracy and IoU per class, plus their mean
(mIoU). For the digits world the default parser thresholds stroke intensity (digits are coloured strokes on
black): ``{0: background, 1: stroke}``. For faces/scenes plug in a real segmenter (e.g. CelebAMask-HQ's
face parser for Collaborative Diffusion).

Counts are accumulated over the whole set in one confusion matrix before dividing (the usual dataset-level
mIoU, as in mmsegmentation), so small images do not weigh more than large ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from common.errors import UserError
from common.io import open_image
from common.metrics.images import ImageSource, count_images, iter_pil_batches


MaskParser = Callable[[Image.Image], np.ndarray]


def parse_stroke_mask(image: Image.Image, threshold: float = 0.5) -> np.ndarray:
    """Digits-world parser: ``1`` where the brightest RGB channel exceeds ``threshold * 255``, else ``0``.

    Uses the channel maximum, not luminance, so a dark-blue stroke on black still counts. Returns int64 ``[H, W]``.
    """
    array = np.asarray(image.convert("RGB"), dtype=np.float64)
    return (array.max(axis=-1) > threshold * 255.0).astype(np.int64)


def stroke_parser(threshold: float = 0.5) -> MaskParser:
    """A :func:`parse_stroke_mask` parser with a fixed threshold (in ``[0, 1]``)."""
    if not 0.0 <= threshold < 1.0:
        raise UserError(f"stroke threshold must be in [0, 1), got {threshold}")
    return lambda image: parse_stroke_mask(image, threshold)


def load_mask(path: str | Path, num_classes: int) -> np.ndarray:
    """Class-id mask ``[H, W]`` int64 from a PNG (grey or palette indices).

    A binary mask saved as 0/255 is read as 0/1 when ``num_classes == 2``. UserError for colour masks.
    """
    try:
        with open_image(path) as image:
            array = np.asarray(image)
    except OSError as err:
        raise UserError(f"cannot read mask {path} ({err}); replace the file") from None
    if array.ndim == 3:
        if not (array[..., :3] == array[..., :1]).all():
            raise UserError(f"mask {path} is a colour image; save class ids as a grey or palette PNG")
        array = array[..., 0]
    array = array.astype(np.int64)
    if num_classes == 2 and set(np.unique(array).tolist()) <= {0, 255}:
        array = array // 255
    return array


def _as_mask(mask, name: str) -> np.ndarray:
    array = np.asarray(mask)
    integral = np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_
    if array.ndim not in (2, 3) or not integral:
        raise UserError(
            f"{name} must be an integer class-id array [H, W] or [N, H, W], got {array.dtype} {list(array.shape)}"
        )
    return array.astype(np.int64)


def confusion_matrix(pred, target, num_classes: int, ignore_index: int | None = None) -> np.ndarray:
    """``[C, C]`` counts, rows = target class, columns = predicted class, for masks of one shape.

    ``pred`` / ``target``: ``[H, W]`` or ``[N, H, W]`` integer class ids in ``[0, C)``; target pixels equal to
    ``ignore_index`` are skipped. UserError when the shapes differ or ids fall outside ``[0, C)``.
    """
    pred, target = _as_mask(pred, "predicted mask"), _as_mask(target, "target mask")
    if pred.shape != target.shape:
        raise UserError(
            f"predicted mask has shape {list(pred.shape)} but the target mask {list(target.shape)}; "
            "generate at the mask's resolution or resize the masks"
        )
    keep = np.ones_like(target, dtype=bool) if ignore_index is None else target != ignore_index
    pred, target = pred[keep], target[keep]
    for values, name in ((target, "target"), (pred, "predicted")):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise UserError(
                f"{name} mask holds class ids {sorted(set(np.unique(values).tolist()))[:10]} outside [0, {num_classes}); "
                "set --num-classes or fix the masks"
            )
    return np.bincount(target * num_classes + pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def scores_from_confusion(confusion: np.ndarray) -> dict:
    """Pixel accuracy and IoU from a ``[C, C]`` confusion matrix.

    ``IoU_c = TP_c / (TP_c + FP_c + FN_c)``. A class absent from both prediction and target (union 0) has IoU
    ``None`` and is left out of ``mean_iou``; a class predicted but absent from the target scores 0.
    """
    total = int(confusion.sum())
    if total == 0:
        raise UserError("masks have no (non-ignored) pixels to compare")
    true_positive = np.diag(confusion).astype(np.float64)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - true_positive
    per_class = [float(tp / u) if u > 0 else None for tp, u in zip(true_positive, union)]
    present = [iou for iou in per_class if iou is not None]
    return {
        "pixel_accuracy": float(true_positive.sum() / total),
        "mean_iou": float(np.mean(present)),
        "per_class_iou": per_class,
        "num_pixels": total,
    }


def mask_agreement(pred, target, num_classes: int, ignore_index: int | None = None) -> dict:
    """Pixel accuracy, per-class IoU and mIoU between predicted and target class-id masks.

    ``pred``/``target``: arrays ``[H, W]`` or ``[N, H, W]``, or equal-length sequences of ``[H, W]`` arrays
    (sizes may differ between pairs, never within one). See :func:`scores_from_confusion` for the result.
    """
    if num_classes < 1:
        raise UserError(f"num_classes must be >= 1, got {num_classes}")
    if isinstance(pred, np.ndarray) or isinstance(target, np.ndarray):
        return scores_from_confusion(confusion_matrix(pred, target, num_classes, ignore_index))
    if len(pred) != len(target):
        raise UserError(f"got {len(pred)} predicted masks but {len(target)} target masks; pair them one to one")
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    for p, t in zip(pred, target):
        confusion += confusion_matrix(p, t, num_classes, ignore_index)
    return scores_from_confusion(confusion)


def parsed_mask_agreement(
    images: ImageSource,
    targets: Sequence[np.ndarray],
    num_classes: int,
    parser: MaskParser = parse_stroke_mask,
    ignore_index: int | None = None,
) -> dict:
    """Parse each generated image with ``parser`` and score it against its target mask (paired by position)."""
    if count_images(images) != len(targets):
        raise UserError(f"got {count_images(images)} images but {len(targets)} masks; pair them one to one")
    predicted = [np.asarray(parser(image)) for batch in iter_pil_batches(images, 64) for image in batch]
    return mask_agreement(predicted, list(targets), num_classes, ignore_index)
