"""Loading the frozen towers from local folders, and the shipped checkpoint layout (scripts, sample_cli).

Names. Every embedding space is identified by the ordered names of the CLIP models that made it (METHOD.md, "Embedding space"), and
the prior's text tokens by the name of their text encoder; banks, caches, priors and decoders store these names
and refuse to mix (``check_clip_models``). A model loaded from a folder is named ``<folder>@<digest>``, the digest
being the first 10 hex digits of the SHA-256 of its weights file: the same weights give the same name whatever the
path, and a retrained CLIP gets a new name, so a prior trained on the old one is refused instead of silently fed
embeddings from another space. (Registered paper models would be named like ``ViT-B-16/openai``.)

Text states. The reference feeds the prior T5-11B encoder states; any local text encoder folder works here: a
transformers T5 (``load_t5_encoder``) or a CLIP text tower (``load_clip_text``, its per-token last hidden states,
as DALL-E 2's prior reads CLIP token encodings). The digits world has no T5, so the shipped tiny prior reads the
per-token states of the shipped tiny CLIP's own text tower (``ckpt/tiny/clip/text_encoder``).

Checkpoint folder (``ckpt/tiny/shifted``)::

    shifted.json        {"format", "clip": [paths], "text_states": path}   paths relative to this folder
    prior/              save_prior: config.json + weights + bank.safetensors        (the shifted prior)
    prior_baseline/     the no-bank (plain DDPM) prior of the same size and budget  (optional)
    decoder/            a StableDiffusionPipeline folder + image_projection/        (finetune.py)
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

import torch

from common.errors import UserError


PathLike = Union[str, Path]
CHECKPOINT_FILE = "shifted.json"
CHECKPOINT_FORMAT = "shifted-diffusion-checkpoint/1"
PROJECTION_FOLDER = "image_projection"
DECODER_FILE = "shifted_decoder.json"
GENERIC_FOLDERS = ("text_encoder", "text_encoder_2", "clip", "model")
WEIGHT_NAMES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "model.safetensors",
    "open_clip_pytorch_model.bin",
    "pytorch_model.bin",
)


# ---------------------------------------------------------------------------------------------------- names


def file_digest(path: PathLike, length: int = 10) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]


def _weights_file(folder: Path, names: Sequence[str]) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    found = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    if not found:
        raise UserError(f"{folder} holds no weights file (*.safetensors / *.bin): pass a model folder")
    return found[0]


def model_name(folder: PathLike, weights_names: Sequence[str] = WEIGHT_NAMES) -> str:
    """``<label>@<digest>`` of a local model folder (label: the folder name, with its parent's when generic)."""
    folder = Path(folder).resolve()
    label = folder.name
    if label in GENERIC_FOLDERS and folder.parent.name:
        label = f"{folder.parent.name}/{label}"
    return f"{label}@{file_digest(_weights_file(folder, weights_names))}"


# ---------------------------------------------------------------------------------------------------- CLIP


@contextlib.contextmanager
def quiet_transformers():
    """No "Loading weights" progress bar from transformers while a frozen tower loads (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_clip_models(paths: Sequence[PathLike], device: Union[str, torch.device] = "cpu"):
    """A :class:`~shifted.embeddings.MultiCLIP` of local open_clip folders, concatenated in the given order."""
    from common.models import load_open_clip
    from shifted.embeddings import MultiCLIP

    if not paths:
        raise UserError("no CLIP model given: pass --clip FOLDER (repeat it for several, in a fixed order)")
    models = []
    for path in paths:
        folder = Path(path)
        if not folder.is_dir():
            raise UserError(f"CLIP folder {folder} does not exist: pass an open_clip folder such as ckpt/tiny/clip")
        model, _, tokenizer = load_open_clip(folder, device=device)
        models.append((model_name(folder), model.float().eval(), tokenizer))
    return MultiCLIP(models)


def load_text_states(path: PathLike, max_length: int, device: Union[str, torch.device] = "cpu"):
    """:class:`~shifted.embeddings.TextStates` of a local T5 or CLIP text-encoder folder, named by its weights.

    Frozen and only ever read, so one process keeps the last few loaded (keyed by folder, weights digest, length
    and device): scripts called again in one process (tests, notebooks) skip re-parsing the tokenizer.
    """
    from common.models import read_model_config, resolve_model_folder

    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"text-encoder folder {folder} does not exist: pass a T5 or CLIP text_encoder folder")
    resolved = resolve_model_folder(folder, None, "text_encoder")
    kind = read_model_config(resolved).get("model_type")
    return _text_states(str(resolved.resolve()), model_name(resolved), kind, int(max_length), str(device))


def text_encoder_name(path: PathLike) -> str:
    """The name :func:`load_text_states` gives a text-encoder folder (what a prior records as ``text_encoder``)."""
    from common.models import resolve_model_folder

    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"text-encoder folder {folder} does not exist: pass a T5 or CLIP text_encoder folder")
    return model_name(resolve_model_folder(folder, None, "text_encoder"))


@functools.lru_cache(maxsize=4)
def _text_states(folder: str, name: str, kind: str, max_length: int, device: str):
    from common.models import load_clip_text, load_t5_encoder
    from shifted.embeddings import TextStates

    with quiet_transformers():
        if kind == "t5":
            encoder, tokenizer = load_t5_encoder(folder)
        else:
            encoder, tokenizer = load_clip_text(folder)
    encoder.requires_grad_(False)
    return TextStates(encoder.float().to(device).eval(), tokenizer, name, max_length=max_length)


def prior_text_encoder(clip_paths: Sequence[PathLike], text_states_path: PathLike, max_length: int, device="cpu"):
    from shifted.embeddings import PriorTextEncoder

    return PriorTextEncoder(load_clip_models(clip_paths, device), load_text_states(text_states_path, max_length, device))


def default_text_states(clip_paths: Sequence[PathLike]) -> Path:
    """The first CLIP folder's transformers text tower (``<clip>/text_encoder``), what the digits world uses."""
    folder = Path(clip_paths[0]) / "text_encoder"
    if not folder.is_dir():
        raise UserError(
            f"{clip_paths[0]} has no text_encoder/ subfolder: pass --text_states (a T5 or CLIP text_encoder folder)"
        )
    return folder


# ------------------------------------------------------------------------------------------- the decoder


def save_decoder(folder: PathLike, pipeline_parts: dict, projection, clip_names: Sequence[str],
                 beside_existing: bool = False) -> Path:
    """An SD pipeline folder (plain ``StableDiffusionPipeline.from_pretrained`` loads it) + ``image_projection/``.

    ``pipeline_parts``: ``vae``, ``unet``, ``text_encoder``, ``tokenizer``, ``scheduler``. The text tower is unused
    by the image-conditioned UNet; kept, the folder is a complete diffusers pipeline; ``None``, diffusers loads it
    with ``from_pretrained(folder, text_encoder=None, tokenizer=None)``. ``beside_existing``: ``folder`` is a
    training run's output folder (checkpoints, logs) and the decoder's entries go in next to them
    (``common.io.save_pretrained_into``); otherwise the folder is written all-or-nothing on its own.
    """
    from diffusers import StableDiffusionPipeline

    from common.io import save_model_folder

    pipe = StableDiffusionPipeline(**pipeline_parts, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)

    def write(tmp: Path) -> None:
        pipe.save_pretrained(tmp, safe_serialization=True)
        projection.save_pretrained(tmp / PROJECTION_FOLDER, safe_serialization=True)
        (tmp / DECODER_FILE).write_text(json.dumps(
            {"clip_models": list(clip_names), "embedding_dim": int(projection.config.in_dim)}, indent=2) + "\n")

    return save_model_folder(folder, write, beside_existing=beside_existing)


def decoder_entries(folder: PathLike) -> list[str]:
    """The entries of a decoder folder that make up the decoder: ``model_index.json``, the components it lists,
    ``image_projection/`` and ``shifted_decoder.json`` (a fine-tune's output folder also holds its checkpoints and
    logs, which a release does not copy)."""
    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    parts = [name for name, value in index.items() if not name.startswith("_") and isinstance(value, list)
             and value[0] is not None and (folder / name).exists()]
    return ["model_index.json", *parts, PROJECTION_FOLDER, DECODER_FILE]


# -------------------------------------------------------------------------------------- checkpoint folder


class ShiftedCheckpoint:
    """The shipped layout: ``shifted.json`` naming the CLIP / text-state folders, ``prior/``, ``decoder/``."""

    def __init__(self, folder: PathLike):
        self.folder = Path(folder)
        meta_path = self.folder / CHECKPOINT_FILE
        if not meta_path.is_file():
            raise UserError(
                f"{self.folder} is not a Shifted Diffusion checkpoint (no {CHECKPOINT_FILE}): pass ckpt/tiny/shifted "
                "or a folder laid out like it (see its README.md)"
            )
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{meta_path} is not valid JSON ({err.msg})") from None
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise UserError(f"{meta_path} has an unknown format {meta.get('format')!r}")
        self.meta = meta
        self.clip_paths = [self._path(p) for p in meta["clip"]]
        self.text_states_path = self._path(meta["text_states"])

    def _path(self, relative: str) -> Path:
        return (self.folder / relative).resolve()

    def prior_folder(self, variant: str = "shifted") -> Path:
        name = {"shifted": "prior", "baseline": "prior_baseline"}.get(variant)
        if name is None:
            raise UserError(f"unknown prior variant {variant!r}: choose shifted or baseline")
        folder = self.folder / name
        if not folder.is_dir():
            raise UserError(f"{self.folder} has no {name}/ folder: retrain it (see {self.folder / 'README.md'})")
        return folder

    @property
    def decoder_folder(self) -> Path:
        return self.folder / "decoder"

    @staticmethod
    def write_meta(folder: PathLike, clip_paths: Sequence[PathLike], text_states: PathLike,
                   relative_to: Optional[PathLike] = None) -> Path:
        """Write ``shifted.json`` into ``folder``, paths relative to ``relative_to`` (default: ``folder``), i.e.
        to where the folder will finally live when it is being written in a temporary place."""
        import os

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        anchor = Path(relative_to or folder).resolve()

        def rel(p):
            return os.path.relpath(Path(p).resolve(), anchor)

        meta = {"format": CHECKPOINT_FORMAT, "clip": [rel(p) for p in clip_paths], "text_states": rel(text_states)}
        (folder / CHECKPOINT_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return folder / CHECKPOINT_FILE
