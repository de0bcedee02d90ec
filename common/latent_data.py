"""The text-to-image data path shared by the baseline and the methods that compare against it: dataset items
``{pixel_values, text}`` -> (scaled VAE latents, CLIP text states), on the fly or from a safetensors cache.

Both arms of a comparison (``scripts/train_text_to_image.py`` and e.g. ContextDiff's stage 2) go through this one
class, so they see identical latents (posterior samples x scaling factor) and text (77-token CLIP states).
"""

from __future__ import annotations

import torch


class LatentTextEncoder:
    """Turns ``{pixel_values, text}`` items into ``(scaled latents, text states)``, on the fly or from a cache."""

    def __init__(self, vae, text_encoder, tokenizer):
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer
        self.scaling = float(vae.config.scaling_factor)

    @torch.no_grad()
    def text(self, captions) -> torch.Tensor:
        ids = self.tokenizer(list(captions), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.text_encoder.device))[0]

    @staticmethod
    def collate(items):
        batch = {}
        for key in items[0]:
            values = [it[key] for it in items]
            batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
        return batch

    @torch.no_grad()
    def encode_batch(self, batch, device):
        if "latent_mean" in batch:  # cached: draw from the stored posterior, as an uncached run would
            mean, std = batch["latent_mean"].to(device), batch["latent_std"].to(device)
            return (mean + std * torch.randn_like(mean)) * self.scaling, batch["text_states"].to(device)
        pixels = batch["pixel_values"].to(device=device, dtype=self.vae.dtype)
        latents = self.vae.encode(pixels).latent_dist.sample() * self.scaling
        return latents, self.text(batch["text"]).to(device)

    @torch.no_grad()
    def cache(self, dataset, cache_dir=None, batch_size: int = 64):
        """Encode the whole dataset once (posterior mean/std and text states); optionally keep it on disk."""
        from common.data import dataset_fingerprint, encode_once, module_fingerprint

        def encode(batch):
            posterior = self.vae.encode(batch["pixel_values"]).latent_dist
            return {"mean": posterior.mean, "std": posterior.std, "states": self.text(batch["text"])}

        key = None
        if cache_dir is not None:
            key = "-".join((dataset_fingerprint(dataset), module_fingerprint(self.vae),
                            module_fingerprint(self.text_encoder)))
        t, reused = encode_once(dataset, encode, cache_dir=cache_dir, key=key, batch_size=batch_size, progress=True)
        if cache_dir is not None:
            print(("reusing" if reused else "wrote") + f" encodings cache {cache_dir}/{key}")
        return CachedLatents(t["mean"], t["std"], t["states"])


class CachedLatents(torch.utils.data.Dataset):
    def __init__(self, mean, std, states):
        self.mean, self.std, self.states = mean, std, states

    def __len__(self):
        return len(self.mean)

    def __getitem__(self, i):
        return {"latent_mean": self.mean[i], "latent_std": self.std[i], "text_states": self.states[i]}
