"""The FID Inception network (TF "2015-12-05" graph ported to PyTorch), loaded from a local weights file.

The network is torch-fidelity's ``FeatureExtractorInceptionV3``: it resizes uint8 images to 299x299 with a
bilinear filter bit-compatible with TensorFlow 1.x (the original FID code) and returns the 2048-d pool3
features. Its weights are the ones every FID paper uses: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``
(torch-fidelity hosts the same file, same hash suffix, as ``weights-inception-2015-12-05-6726825d.pth``),
or the same state dict saved as ``.safetensors``.

Safety: torch-fidelity unpickles a user-given path with ``torch.load(weights_only=False)``. We never hand it a
path: we read the file ourselves (``weights_only=True`` or safetensors) and inject the state dict through the
loader it would otherwise use to download the weights, so it neither unpickles code nor touches the network.
"""

from __future__ import annotations

import threading
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from common.errors import UserError, one_line
from common.io import safe_torch_load
from common.metrics.images import ImageSource, count_images, iter_uint8_batches


FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FEATURE_LAYER = "2048"
_INJECT_LOCK = threading.Lock()


def load_inception_state_dict(weights_path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict ``{name: tensor}`` from ``.pth``/``.pt`` (``weights_only=True``) or ``.safetensors``.

    Reading goes through :func:`common.io.safe_torch_load`, so a pickle that would run code is refused.
    """
    path = Path(weights_path)
    if not path.is_file():
        raise UserError(
            f"Inception weights {path} not found; pass --inception-weights with the local {FID_WEIGHTS_FILE} file"
        )
    state_dict = safe_torch_load(path)  # weights_only=True / safetensors; refused pickles become a UserError
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise UserError(f"{path} is not a state dict of tensors; use the {FID_WEIGHTS_FILE} file")
    return state_dict


def load_fid_inception(weights_path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The FID Inception feature extractor with weights from a local file, in eval mode on ``device``.

    Call it with ``uint8 [B, 3, H, W]``; it returns a 1-tuple with the ``[B, 2048]`` pool3 features.
    """
    from torch_fidelity import feature_extractor_inceptionv3 as tf_inception

    state_dict = load_inception_state_dict(weights_path)

    def _no_download(*_args, **_kwargs):
        return state_dict

    with _INJECT_LOCK, mock.patch.object(tf_inception, "load_state_dict_from_url", _no_download):
        try:
            network = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", [FEATURE_LAYER])
        except RuntimeError as err:  # strict load_state_dict: wrong keys or shapes
            raise UserError(
                f"{weights_path} does not hold the FID Inception weights ({one_line(str(err))[:200]}); "
                f"use {FID_WEIGHTS_FILE}"
            ) from None
    return network.to(device)


@torch.inference_mode()
def image_features(source: ImageSource, extractor, batch_size: int = 50, device: str | torch.device = "cpu"):
    """Features ``[N, D]`` (float64 numpy) of every image of ``source`` through ``extractor``.

    ``extractor`` maps ``uint8 [B, 3, H, W]`` to ``[B, D]`` or a 1-tuple of it (torch-fidelity's convention).
    Images of equal size go through in batches; a batch of mixed sizes goes one image at a time (the Inception
    extractor resizes each to 299x299 itself).
    """
    outputs = []
    for batch in iter_uint8_batches(source, batch_size):
        groups = [torch.stack(batch)] if len({img.shape for img in batch}) == 1 else [img[None] for img in batch]
        for images in groups:
            out = extractor(images.to(device))
            out = out[0] if isinstance(out, (tuple, list)) else out
            outputs.append(out.reshape(out.shape[0], -1).double().cpu())
    if not outputs:
        raise UserError("no images were given; pass a non-empty folder, list or tensor of images")
    return torch.cat(outputs).numpy().astype(np.float64)


def inception_features(
    folder_or_images: ImageSource, weights_path: str | Path, batch_size: int = 50, device: str | torch.device = "cpu"
) -> np.ndarray:
    """FID Inception pool3 features ``[N, 2048]`` (float64) of a folder / list / tensor of images.

    Loads the network from ``weights_path`` each call; to embed several sets, call :func:`load_fid_inception`
    once and :func:`image_features` per set.
    """
    count_images(folder_or_images)  # fails fast on a missing or empty folder, before loading 95 MB of weights
    extractor = load_fid_inception(weights_path, device)
    return image_features(folder_or_images, extractor, batch_size=batch_size, device=device)
