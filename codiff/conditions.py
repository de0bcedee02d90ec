"""Conditions of the uni-modal models: palette masks -> one-hot tokens, prompts -> text tokens.

Both end as a sequence of tokens ``[B, L, D]`` that a UNet cross-attends to (``encoder_hidden_states``), which is
what lets one collaboration treat every modality alike (Collaborative Diffusion, Huang et al. CVPR 2023, §3).

Mask format. A mask is an image whose pixel values ARE class ids ``0 .. K-1``: a palette PNG (PIL mode
``P``, as CelebAMask-HQ ships them) or a greyscale PNG. It becomes ``K`` tokens, one per class, each the flattened
``grid x grid`` binary map of that class after a nearest-neighbour resize::

    ids [H, W] --resize nearest (pixel centres)--> [grid, grid] --one_hot--> [grid*grid, K] --T--> [K, grid*grid]

and a linear layer maps every token to the cross-attention width: ``[B, K, grid*grid] -> [B, K, D]``
(:class:`MaskEncoder`, trained jointly with the mask-to-image UNet). Ids are never interpolated: a bilinear resize
would invent class ``1.5``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import nn

from common.data import CELEBA_PARTS
from common.errors import UserError, one_line
from common.io import PathLike, atomic_write_dir, load_safetensors, open_image, require_file, save_safetensors


# CelebAMask-HQ's 19 classes and colours (CelebAMask-HQ ``g_mask.py``; the palette of Collaborative Diffusion's
# ``test_data/*_masks/*.png``). Id 0 is the background.
CELEBAMASK_HQ_CLASSES = ("background", *CELEBA_PARTS)  # the order the dataset's part maps are combined in
CELEBAMASK_HQ_PALETTE = (
    (0, 0, 0), (204, 0, 0), (76, 153, 0), (204, 204, 0), (51, 51, 255), (204, 0, 204), (0, 255, 255),
    (255, 204, 204), (102, 51, 0), (255, 0, 0), (102, 204, 0), (255, 255, 0), (0, 0, 153), (0, 0, 204),
    (255, 51, 153), (0, 204, 204), (0, 51, 0), (255, 153, 51), (0, 204, 0),
)
# The embedded "digits" world: a stroke on black.
DIGITS_CLASSES = ("background", "stroke")
DIGITS_PALETTE = ((0, 0, 0), (255, 255, 255))

Color = tuple[int, int, int]


def _default_palette(num_classes: int) -> tuple[Color, ...]:
    """Distinct colours for ``num_classes`` ids: CelebAMask-HQ's first, then a deterministic spread of hues."""
    if num_classes <= len(CELEBAMASK_HQ_PALETTE):
        return CELEBAMASK_HQ_PALETTE[:num_classes]
    rng = np.random.default_rng(0)
    extra = [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(num_classes - len(CELEBAMASK_HQ_PALETTE))]
    return CELEBAMASK_HQ_PALETTE + tuple(extra)  # type: ignore[return-value]


class MaskFormat:
    """What a valid mask of one dataset looks like: ``K`` class names, their colours, the grid of the tokens.

    ``image_size`` (``(H, W)`` or None): the resolution masks must have, the output resolution of the model they
    drive; None accepts any size.
    """

    def __init__(
        self,
        class_names: Sequence[str],
        grid: int,
        palette: Optional[Sequence[Sequence[int]]] = None,
        image_size: Optional[Sequence[int]] = None,
    ):
        self.class_names = tuple(class_names)
        if len(self.class_names) < 1:
            raise UserError("a mask format needs at least one class name")
        if grid < 1:
            raise UserError(f"the mask token grid must be >= 1, got {grid}")
        self.grid = int(grid)
        colours = _default_palette(self.num_classes) if palette is None else palette
        self.palette: tuple[Color, ...] = tuple((int(r), int(g), int(b)) for r, g, b in colours)
        if len(self.palette) != self.num_classes:
            raise UserError(f"the palette has {len(self.palette)} colours for {self.num_classes} classes: give one "
                            "colour per class")
        if len(set(self.palette)) != len(self.palette):
            raise UserError("the palette repeats a colour: colours must identify classes uniquely")
        self.image_size = None if image_size is None else (int(image_size[0]), int(image_size[1]))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def token_dim(self) -> int:
        """Length of one class token before the encoder: ``grid * grid``."""
        return self.grid * self.grid

    @classmethod
    def celebamask_hq(cls, image_size: Optional[int] = 512, grid: int = 32) -> MaskFormat:
        """The paper's format: 19 CelebAMask-HQ classes, 32x32 grid (tokens of 1024)."""
        size = None if image_size is None else (image_size, image_size)
        return cls(CELEBAMASK_HQ_CLASSES, grid, CELEBAMASK_HQ_PALETTE, size)

    @classmethod
    def from_config(cls, config: dict) -> MaskFormat:
        """From a config section: ``classes`` (a list or ``celebamask_hq`` / ``digits``), ``grid``, ``palette``,
        ``image_size``."""
        classes = config.get("classes", "celebamask_hq")
        palette = config.get("palette")
        if classes == "celebamask_hq":
            classes, palette = CELEBAMASK_HQ_CLASSES, palette or CELEBAMASK_HQ_PALETTE
        elif classes == "digits":
            classes, palette = DIGITS_CLASSES, palette or DIGITS_PALETTE
        size = config.get("image_size")
        if isinstance(size, int):
            size = (size, size)
        return cls(classes, int(config["grid"]), palette, size)

    def to_config(self) -> dict:
        return {"classes": list(self.class_names), "grid": self.grid, "palette": [list(c) for c in self.palette],
                "image_size": None if self.image_size is None else list(self.image_size)}

    def describe(self) -> str:
        names = ", ".join(f"{i} {name}" for i, name in enumerate(self.class_names[:6]))
        more = ", ..." if self.num_classes > 6 else ""
        return f"0..{self.num_classes - 1} ({names}{more})"


# ------------------------------------------------------------------------------------------------ validation


def validate_mask_ids(ids: torch.Tensor, fmt: MaskFormat, source: str = "mask") -> torch.Tensor:
    """Check an id map ``[..., H, W]`` (integer) against the format: ids inside the palette, size as expected."""
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise UserError(f"{source} holds {ids.dtype} values: class-id masks are integer maps (ids 0..K-1)")
    if ids.ndim < 2:
        raise UserError(f"{source} has shape {tuple(ids.shape)}: a mask is an [H, W] map of class ids")
    bad = torch.unique(ids[(ids < 0) | (ids >= fmt.num_classes)])
    if bad.numel():
        shown = ", ".join(str(int(v)) for v in bad[:8]) + (", ..." if bad.numel() > 8 else "")
        raise UserError(
            f"{source} has class ids {{{shown}}} outside the palette {fmt.describe()}: re-export it with ids "
            f"0..{fmt.num_classes - 1} (a 0/255 binary mask must be divided by 255; a colour mask must be "
            "converted to ids)"
        )
    height, width = ids.shape[-2:]
    if fmt.image_size is not None and (height, width) != fmt.image_size:
        want_h, want_w = fmt.image_size
        raise UserError(
            f"{source} is {width}x{height} but the model makes {want_w}x{want_h} images: give a mask of the output "
            "size (resize it with nearest-neighbour, never bilinear, so class ids stay ids)"
        )
    if height < fmt.grid or width < fmt.grid:
        raise UserError(f"{source} is {width}x{height}, smaller than the {fmt.grid}x{fmt.grid} token grid: give a "
                        "larger mask")
    return ids.long()


def _rgb_to_ids(rgb: np.ndarray, fmt: MaskFormat, source: str) -> np.ndarray:
    """Ids of an ``[H, W, 3]`` mask: palette colours map to their class; failing that, a grey image (R = G = B)
    is read as grey levels = ids; anything else names the colours that are not in the palette."""
    codes = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    ids = np.full(codes.shape, -1, dtype=np.int64)
    for index, (r, g, b) in enumerate(fmt.palette):
        ids[codes == ((r << 16) | (g << 8) | b)] = index
    unknown = np.unique(codes[ids < 0])
    if not unknown.size:
        return ids
    if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
        return rgb[..., 0].astype(np.int64)
    shown = ", ".join(f"({c >> 16}, {(c >> 8) & 255}, {c & 255})" for c in unknown[:5])
    raise UserError(
        f"{source} is a colour mask with colours {shown} that are not in the palette (antialiased edges?): "
        "save it as a palette/greyscale PNG of class ids, or paint only palette colours"
    )


def load_mask(path: PathLike, fmt: MaskFormat) -> torch.Tensor:
    """Read a mask file as class ids ``LongTensor [H, W]``, validated against ``fmt``.

    Accepted: palette PNGs (mode ``P``: the stored indices are the ids, as in the released test masks), greyscale
    (``L``, ``I``, ``I;16``, ``1``: the values are the ids), RGB whose pixels are palette colours (mapped back to
    ids; the released code crashes on those), and grey stored as RGB. Anything else, ids outside the
    palette or a size other than ``fmt.image_size`` is a one-line :class:`UserError`.
    """
    path = require_file(path, "mask")
    try:
        with open_image(path) as image:
            image.load()
            mode = image.mode
            if mode in ("P", "L", "I", "I;16", "1"):
                array = np.asarray(image).astype(np.int64)
            elif mode in ("RGB", "RGBA"):
                array = _rgb_to_ids(np.asarray(image.convert("RGB")), fmt, f"mask {path}")
            else:
                raise UserError(f"mask {path} has PIL mode {mode}: save it as a palette or greyscale PNG of class ids")
    except UnidentifiedImageError:
        raise UserError(f"mask {path} is not an image PIL can read: give a PNG of class ids") from None
    except OSError as err:
        raise UserError(f"mask {path} is truncated or corrupt ({one_line(str(err))}): re-export it") from None
    return validate_mask_ids(torch.from_numpy(array), fmt, f"mask {path}")


# ---------------------------------------------------------------------------------------- one-hot tokens


def resize_ids_nearest(ids: torch.Tensor, size: Union[int, Sequence[int]]) -> torch.Tensor:
    """Nearest-neighbour resize of id maps ``[..., H, W]`` sampling output-pixel centres.

    ``nearest-exact`` samples source pixel ``floor((i + 0.5) * H / h)``, which is PIL's ``NEAREST`` (the released
    preprocessing); torch's plain ``nearest`` samples ``floor(i * H / h)``, one half-cell off.
    """
    size = (size, size) if isinstance(size, int) else tuple(size)
    lead = ids.shape[:-2]
    flat = ids.reshape(-1, 1, *ids.shape[-2:]).float()  # ids < 2**24 are exact in float32
    out = F.interpolate(flat, size=size, mode="nearest-exact")
    return out.round().long().reshape(*lead, *size)


def mask_to_tokens(ids: torch.Tensor, num_classes: int, grid: int) -> torch.Tensor:
    """Class-id maps ``[B, H, W]`` -> one-hot class tokens ``[B, K, grid*grid]`` (float, row-major pixels).

    Token ``k`` of sample ``b`` is the binary map "pixel is class k" on the ``grid x grid`` lattice; every pixel
    column sums to one.
    """
    if ids.ndim == 2:
        ids = ids[None]
    small = resize_ids_nearest(ids, grid)  # [B, g, g]
    one_hot = F.one_hot(small.flatten(1), num_classes)  # [B, g*g, K]
    return one_hot.transpose(1, 2).float()


class MaskEncoder(nn.Module):
    """One-hot class tokens ``[B, K, grid*grid]`` -> cross-attention tokens ``[B, K, D]`` (a Linear, as in the paper's mask encoder).

    The paper's is ``Linear(1024, 640)`` (656k parameters), trained jointly with the mask-to-image UNet.
    ``encode_ids`` goes straight from id maps ``[B, H, W]``.
    """

    def __init__(self, fmt: MaskFormat, dim: int):
        super().__init__()
        self.fmt = fmt
        self.proj = nn.Linear(fmt.token_dim, dim)

    @property
    def dim(self) -> int:
        return self.proj.out_features

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(tokens.to(self.proj.weight.dtype))

    def one_hot(self, ids: torch.Tensor) -> torch.Tensor:
        """Validated ids ``[B, H, W]`` -> one-hot tokens ``[B, K, grid*grid]`` on this encoder's device."""
        ids = validate_mask_ids(ids, self.fmt)
        return mask_to_tokens(ids.to(self.proj.weight.device), self.fmt.num_classes, self.fmt.grid)

    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self(self.one_hot(ids))

    def null_one_hot(self, batch_size: int) -> torch.Tensor:
        """The 'no mask' input: all-zero one-hot tokens ``[B, K, grid*grid]`` (condition dropout / CFG, non-paper)."""
        return torch.zeros(batch_size, self.fmt.num_classes, self.fmt.token_dim, device=self.proj.weight.device)

    def null_tokens(self, batch_size: int) -> torch.Tensor:
        """The 'no mask' condition: the encoded :meth:`null_one_hot`, i.e. the bias alone."""
        return self(self.null_one_hot(batch_size))

    def save_pretrained(self, folder: PathLike) -> Path:
        """``config.json`` + ``model.safetensors``, written atomically."""
        with atomic_write_dir(folder) as tmp:
            (tmp / "config.json").write_text(json.dumps({"format": self.fmt.to_config(), "dim": self.dim}, indent=2))
            save_safetensors(self.state_dict(), tmp / "model.safetensors")
        return Path(folder)

    @classmethod
    def from_pretrained(cls, folder: PathLike) -> MaskEncoder:
        config = json.loads(require_file(Path(folder) / "config.json", "mask encoder config").read_text())
        encoder = cls(MaskFormat.from_config(config["format"]), int(config["dim"]))
        encoder.load_state_dict(load_safetensors(Path(folder) / "model.safetensors"))
        return encoder.eval()


def mask_to_rgb(ids: torch.Tensor, fmt: MaskFormat) -> Image.Image:
    """An id map ``[H, W]`` rendered in the format's palette (the mask copy next to generated images)."""
    palette = torch.tensor(fmt.palette, dtype=torch.uint8)
    return Image.fromarray(palette[validate_mask_ids(ids, fmt)].numpy())


# ------------------------------------------------------------------------------------------------------- text


class TextConditioner:
    """Prompts -> token states ``[B, L, D]`` with a transformers tokenizer and text encoder (CLIP in our digits
    world; the paper's from-scratch BERT-tokenised encoder in the 512 face setting).

    Prompts are padded to ``max_length`` (default: the tokenizer's ``model_max_length``, 77) like Stable
    Diffusion and the released code. A prompt longer than that is truncated with a warning that says how many
    tokens were dropped, rather than silently (the released code) or with an error.
    """

    def __init__(self, tokenizer, text_encoder: nn.Module, max_length: Optional[int] = None):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.max_length = int(max_length or tokenizer.model_max_length)

    def tokenize(self, prompts: Union[str, Sequence[str]]) -> torch.Tensor:
        """Token ids ``[B, max_length]``; warns (``UserWarning``) for each prompt that had to be truncated."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise UserError("text conditions must be strings: pass the prompt text, not token ids")
        full = self.tokenizer(prompts, padding=False, truncation=False)["input_ids"]
        for prompt, ids in zip(prompts, full):
            if len(ids) > self.max_length:
                warnings.warn(
                    f"prompt {prompt[:40]!r}... is {len(ids)} tokens, over the text encoder's limit of "
                    f"{self.max_length}: the last {len(ids) - self.max_length} tokens are dropped (shorten it to "
                    "keep them)",
                    UserWarning,
                    stacklevel=2,
                )
        return self.tokenizer(
            prompts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        ).input_ids

    def __call__(self, prompts: Union[str, Sequence[str]]) -> torch.Tensor:
        device = next(self.text_encoder.parameters()).device
        ids = self.tokenize(prompts).to(device)
        return self.text_encoder(ids)[0]

    def null_ids(self, batch_size: int) -> torch.Tensor:
        """The empty prompt's ids ``[B, max_length]`` (condition dropout, non-paper)."""
        return self.tokenize([""] * batch_size)

    def null_tokens(self, batch_size: int) -> torch.Tensor:
        """The empty prompt's states, the unconditional branch of CFG (non-paper, METHOD.md "CFG")."""
        return self([""] * batch_size)
