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
    """Encode ``dataset`` once: VAE posterior of every image; ``keys`` kept as they are; with a
    ``text_conditioner``, the caption token states as ``text_states [N, L, D]`` too."""
    from tqdm.auto import tqdm

    if len(dataset) == 0:
        raise UserError("the training set is empty")
    means, stds, states = [], [], []
    extras: dict[str, list] = {key: [] for key in keys}
    device = next(vae.parameters()).device
    for start in tqdm(range(0, len(dataset), batch_size), desc="caching latents", disable=not progress):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        for key in keys:
            if key not in items[0]:
                raise UserError(f"the dataset items have no {key!r} entry (keys: {', '.join(items[0])}): masks need "
                                "a mask_file_name column in metadata.jsonl")
            extras[key] += [it[key] for it in items]
        pixels = torch.stack([it["pixel_values"] for it in items]).to(device=device, dtype=vae.dtype)
        posterior = vae.encode(pixels).latent_dist
        means.append(posterior.mean.float().cpu())
        stds.append(posterior.std.float().cpu())
        if text_conditioner is not None:
            states.append(text_conditioner([it["text"] for it in items]).float().cpu())
    packed: dict[str, Any] = {}
    for key, values in extras.items():
        packed[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else list(values)
    if text_conditioner is not None:
        packed["text_states"] = torch.cat(states)
    return CachedLatents(torch.cat(means), torch.cat(stds), float(vae.config.scaling_factor), packed)
