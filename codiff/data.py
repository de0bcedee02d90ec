"""Training data of the collaboration: image folders with captions and class-id masks, optionally cached.

Items of ``common.data.image_text_dataset(..., num_mask_classes=K)`` carry ``pixel_values [3, R, R]`` in [-1, 1],
``text`` and ``mask [R, R]`` (long). :func:`cache_latents` encodes every image once with the frozen VAE (posterior
mean and std, so every epoch still *samples* the posterior as LDM does) and, given a frozen text
conditioner, every caption once; :class:`CachedLatents` then serves ``latents`` (``s * (mean + std * noise)``),
``mask`` and ``text`` / ``text_states``. The noise comes from the global torch RNG, which the shared trainer scopes
per batch fetch, so cached runs stay exactly resumable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from common.errors import UserError


# LDM's schedule as a diffusers DDIM scheduler config (METHOD.md, "Process" / "DDIM"): the default for a new member.
LDM_SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.0015,
    "beta_end": 0.0195,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
}


def check_eps_schedule(config: dict, source: str) -> dict:
    """Members are eps models (METHOD.md, "Members"); a v- or x0-prediction scheduler config is a UserError."""
    ptype = config.get("prediction_type", "epsilon")
    if ptype not in ("epsilon", "eps"):
        raise UserError(f"{source} has prediction_type {ptype!r}: Collaborative Diffusion combines eps predictions, "
                        "use an epsilon-prediction schedule")
    return dict(config)


class CachedLatents(Dataset):
    """Pre-encoded items: ``latents`` drawn from the stored posterior, plus the stored conditions."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, scaling_factor: float, extras: dict[str, Any]):
        self.mean, self.std, self.scaling_factor = mean, std, float(scaling_factor)
        self.extras = extras
        for key, values in extras.items():
            if len(values) != len(mean):
                raise ValueError(f"cached {key!r} has {len(values)} entries for {len(mean)} latents")

    def __len__(self) -> int:
        return len(self.mean)

    def __getitem__(self, index: int) -> dict[str, Any]:
        mean, std = self.mean[index], self.std[index]
        item = {"latents": (mean + std * torch.randn_like(mean)) * self.scaling_factor}
        item.update({key: values[index] for key, values in self.extras.items()})
        return item


@torch.no_grad()
def cache_latents(
    dataset: Dataset,
    vae: torch.nn.Module,
    *,
    text_conditioner: Any = None,
    keys: Sequence[str] = ("mask", "text"),
    batch_size: int = 64,
    progress: bool = True,
) -> CachedLatents:
    """Encode ``dataset`` once (:func:`common.data.encode_once`): VAE posterior of every image; ``keys`` kept as
    they are; with a ``text_conditioner``, the caption token states as ``text_states [N, L, D]`` too."""
    from common.data import encode_once

    if len(dataset) == 0:
        raise UserError("the training set is empty")
    first = dataset[0]
    for key in keys:
        if key not in first:
            raise UserError(f"the dataset items have no {key!r} entry (keys: {', '.join(first)}): masks need "
                            "a mask_file_name column in metadata.jsonl")
    device = next(vae.parameters()).device

    def encode(batch):
        pixels = batch["pixel_values"].to(device=device, dtype=vae.dtype)
        posterior = vae.encode(pixels).latent_dist
        out = {"mean": posterior.mean.float(), "std": posterior.std.float()}
        out.update({f"extra:{key}": batch[key] for key in keys})
        if text_conditioner is not None:
            out["text_states"] = text_conditioner(list(batch["text"])).float()
        return out

    encoded, _ = encode_once(dataset, encode, batch_size=batch_size, progress=progress)
    packed: dict[str, Any] = {key.removeprefix("extra:"): value for key, value in encoded.items()
                              if key.startswith("extra:") or key == "text_states"}
    return CachedLatents(encoded["mean"], encoded["std"], float(vae.config.scaling_factor), packed)
