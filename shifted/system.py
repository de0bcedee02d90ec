"""The whole text -> image system: prior + bank + caption encoders + image-embedding decoder, loaded and checked.

``load_system`` resolves the pieces from a checkpoint folder (``ckpt/tiny/shifted``: ``shifted.json``, ``prior/``,
``decoder/``) and/or explicit paths, and checks that they live in one embedding space: the prior, its bank and the
decoder name the same CLIP models as the encoders given, and the prior's text tokens come from the text encoder
given. :func:`text_to_image` is the reference ``sft_test.py`` chain; :func:`image_to_image` is ``test.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from common.errors import UserError
from shifted.checkpoint import ShiftedCheckpoint, load_clip_models, load_text_states
from shifted.pipeline import ImageDecoder


PathLike = Union[str, Path]


@dataclass
class ShiftedSystem:
    prior: Optional[torch.nn.Module]
    bank: Optional[torch.nn.Module]
    encoder: Optional[object]  # PriorTextEncoder (None when only images are embedded)
    clip: object  # MultiCLIP
    decoder: Optional[ImageDecoder]


def load_system(
    checkpoint: Optional[PathLike] = None,
    *,
    prior: Optional[PathLike] = None,
    decoder: Optional[PathLike] = None,
    clip: Optional[Sequence[PathLike]] = None,
    text_states: Optional[PathLike] = None,
    prior_variant: str = "shifted",
    need_prior: bool = True,
    need_decoder: bool = True,
    device: Union[str, torch.device] = "cpu",
) -> ShiftedSystem:
    """Load what is needed; explicit paths override the checkpoint's. Mismatched pieces are a UserError."""
    from shifted.embeddings import PriorTextEncoder
    from shifted.pipeline import check_text_encoder, load_prior

    ckpt = ShiftedCheckpoint(checkpoint) if checkpoint is not None else None
    clip_paths = list(clip) if clip else (ckpt.clip_paths if ckpt else None)
    if not clip_paths:
        raise UserError("no CLIP model given: pass --clip (or a --checkpoint folder whose shifted.json names it)")
    multi = load_clip_models(clip_paths, device)
    system = ShiftedSystem(None, None, None, multi, None)
    if need_prior:
        prior_folder = Path(prior) if prior else (ckpt.prior_folder(prior_variant) if ckpt else None)
        if prior_folder is None:
            raise UserError("no prior given: pass --prior FOLDER (train.py's --output_dir) or --checkpoint")
        system.prior, system.bank = load_prior(prior_folder, device=device)
        states_path = Path(text_states) if text_states else (ckpt.text_states_path if ckpt else None)
        if states_path is None:
            from shifted.checkpoint import default_text_states

            states_path = default_text_states(clip_paths)
        states = load_text_states(states_path, system.prior.config.text_len, device)
        system.encoder = PriorTextEncoder(multi, states)
        check_text_encoder(system.prior, system.encoder)
    if need_decoder:
        decoder_folder = Path(decoder) if decoder else (ckpt.decoder_folder if ckpt else None)
        if decoder_folder is None:
            raise UserError("no decoder given: pass --decoder FOLDER (finetune.py's --output_dir)")
        system.decoder = ImageDecoder.from_pretrained(decoder_folder, device)
        system.decoder.check_clip_models(multi.names, "the CLIP models given")
    return system


def prompt_embeddings(system: ShiftedSystem, prompts: Sequence[str], seed: int = 0, **prior_kwargs) -> torch.Tensor:
    """Prior samples ``[B, D]`` for captions (one generator seeded with ``seed``)."""
    from shifted.pipeline import sample_prior_from_texts

    generator = torch.Generator().manual_seed(seed)
    return sample_prior_from_texts(system.prior, system.bank, system.encoder, prompts, generator=generator,
                                   **prior_kwargs).cpu()


def negative_embedding(system: ShiftedSystem, negative_prompt: str = "", seed: int = 0, **prior_kwargs):
    """The decoder's negative: the prior's embedding of ``negative_prompt`` if given, else the stored CFG null."""
    if not negative_prompt.strip():
        return None
    return prompt_embeddings(system, [negative_prompt], seed, **prior_kwargs)


def text_to_image(
    system: ShiftedSystem,
    prompts: Sequence[str],
    *,
    seed: int = 0,
    prior_kwargs: Optional[dict] = None,
    decoder_kwargs: Optional[dict] = None,
    negative_prompt: str = "",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [B, 3, H, W] in [0, 1], embeddings [B, D])``: text -> prior -> embedding -> decoder."""
    prior_kwargs = dict(prior_kwargs or {})
    embeddings = prompt_embeddings(system, prompts, seed, **prior_kwargs)
    negative = negative_embedding(system, negative_prompt, seed, **prior_kwargs)
    images = system.decoder(embeddings, negative_emb=negative, generator=torch.Generator().manual_seed(seed),
                            **(decoder_kwargs or {}))
    return images.cpu(), embeddings


def square_pixels(images: Sequence, size: int) -> torch.Tensor:
    """PIL images -> ``[B, 3, size, size]`` in [0, 1]: centre crop to the short side, LANCZOS resize."""
    import numpy as np
    from PIL import Image

    out = []
    for image in images:
        w, h = image.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS)
        out.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return torch.stack(out)


def image_to_image(
    system: ShiftedSystem,
    images: Sequence,
    *,
    seed: int = 0,
    negative: str = "null",
    decoder_kwargs: Optional[dict] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, embeddings)``: CLIP image embedding of each input -> decoder (the reference ``test.py``).

    ``negative``: ``null`` (the embedding fine-tuning dropped to, stored with the projection) or ``black`` (the
    CLIP embedding of an all-black image, the reference test.py's choice).
    """
    from shifted.data import clip_resolution

    size = clip_resolution(system.clip)
    pixels = square_pixels(images, size)
    embeddings = system.clip.encode_image(pixels).cpu()
    if negative == "black":
        negative_emb = system.clip.encode_image(torch.zeros(1, 3, size, size)).cpu()
    elif negative == "null":
        negative_emb = None
    else:
        raise UserError(f"unknown --negative {negative!r}: choose null or black")
    out = system.decoder(embeddings, negative_emb=negative_emb, generator=torch.Generator().manual_seed(seed),
                         **(decoder_kwargs or {}))
    return out.cpu(), embeddings
