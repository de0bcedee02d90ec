"""Conditions: palette masks -> one-hot class tokens, prompts -> tokens, and their bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from codiff.conditions import (
    CELEBAMASK_HQ_PALETTE,
    MaskEncoder,
    MaskFormat,
    TextConditioner,
    load_mask,
    mask_to_rgb,
    mask_to_tokens,
    resize_ids_nearest,
)
from common.errors import UserError


DIGITS = MaskFormat.from_config({"classes": "digits", "grid": 16, "image_size": 32})


def _palette_png(path, ids: np.ndarray, palette=CELEBAMASK_HQ_PALETTE):
    image = Image.fromarray(ids.astype(np.uint8), mode="P")
    image.putpalette([v for colour in palette for v in colour])
    image.save(path)
    return path


def test_palette_png_becomes_the_released_one_hot_tokens(tmp_path):
    """A 512x512 CelebAMask-HQ palette mask -> [1, 19, 1024], equal to the released PIL recipe."""
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 19, size=(8, 8))
    ids = np.kron(blocks, np.ones((64, 64), dtype=np.int64))
    ids[100:140, 7:300] = 13  # a stripe not aligned with the 16-pixel cells: NEAREST's sampling point matters
    path = _palette_png(tmp_path / "27007.png", ids)
    fmt = MaskFormat.celebamask_hq(512)
    tokens = mask_to_tokens(load_mask(path, fmt)[None], fmt.num_classes, fmt.grid)
    # The released preprocessing (generate.py): PIL resize NEAREST, flatten, one_hot, transpose.
    small = np.asarray(Image.open(path).resize((32, 32), Image.NEAREST)).reshape(-1)
    released = torch.nn.functional.one_hot(torch.from_numpy(small.astype(np.int64)), 19).T[None].float()
    assert tokens.shape == (1, 19, 1024)
    assert torch.equal(tokens, released)
    assert torch.equal(tokens.sum(1), torch.ones(1, 1024))


@pytest.mark.parametrize("src, dst", [(32, 16), (37, 16), (100, 32)])
def test_nearest_resize_matches_pil_nearest(src, dst):
    ids = torch.randint(0, 19, (src, src), generator=torch.Generator().manual_seed(src))
    pil = np.asarray(Image.fromarray(ids.numpy().astype(np.uint8)).resize((dst, dst), Image.NEAREST))
    assert torch.equal(resize_ids_nearest(ids, dst), torch.from_numpy(pil.astype(np.int64)))


def test_greyscale_and_palette_colour_masks_load_as_ids(tmp_path):
    ids = np.zeros((32, 32), dtype=np.uint8)
    ids[8:24, 10:20] = 1
    Image.fromarray(ids, mode="L").save(tmp_path / "grey.png")
    rgb = np.asarray(DIGITS.palette, dtype=np.uint8)[ids]
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    for name in ("grey.png", "colour.png"):
        assert torch.equal(load_mask(tmp_path / name, DIGITS), torch.from_numpy(ids.astype(np.int64)))
    assert np.array_equal(np.asarray(mask_to_rgb(torch.from_numpy(ids), DIGITS)), rgb)


def test_ids_outside_the_palette_are_refused(tmp_path):
    ids = np.zeros((32, 32), dtype=np.uint8)
    ids[4:8, 4:8] = 255  # a 0/255 binary mask
    Image.fromarray(ids, mode="L").save(tmp_path / "binary.png")
    with pytest.raises(UserError, match=r"class ids \{255\} outside the palette 0..1 \(0 background, 1 stroke\)"):
        load_mask(tmp_path / "binary.png", DIGITS)
    with pytest.raises(UserError, match=r"class ids \{2, 7\}"):
        MaskEncoder(DIGITS, 32).encode_ids(torch.tensor([[2, 7] * 16] * 32))


def test_masks_of_the_wrong_size_or_kind_are_refused(tmp_path):
    Image.fromarray(np.zeros((48, 32), dtype=np.uint8), mode="L").save(tmp_path / "tall.png")
    with pytest.raises(UserError, match="is 32x48 but the model makes 32x32 images"):
        load_mask(tmp_path / "tall.png", DIGITS)
    noisy = np.zeros((32, 32, 3), dtype=np.uint8)
    noisy[3, 3] = (128, 10, 10)  # an antialiased edge colour
    Image.fromarray(noisy).save(tmp_path / "rgb.png")
    with pytest.raises(UserError, match=r"colours \(128, 10, 10\) that are not in the palette"):
        load_mask(tmp_path / "rgb.png", DIGITS)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(UserError, match="not an image"):
        load_mask(tmp_path / "text.png", DIGITS)
    with pytest.raises(UserError, match="smaller than the 16x16 token grid"):
        MaskEncoder(MaskFormat(("a", "b"), 16), 8).encode_ids(torch.zeros(8, 8, dtype=torch.long))


def test_mask_encoder_maps_class_tokens_and_round_trips(tmp_path):
    encoder = MaskEncoder(DIGITS, 32)
    ids = torch.zeros(2, 32, 32, dtype=torch.long)
    ids[1, 8:24, 8:24] = 1
    tokens = encoder.encode_ids(ids)
    assert tokens.shape == (2, 2, 32)
    assert not torch.allclose(tokens[0], tokens[1])  # the stroke changes the tokens
    assert torch.equal(encoder.null_tokens(2), encoder.proj.bias.expand(2, 2, 32))
    encoder.save_pretrained(tmp_path / "mask_encoder")
    loaded = MaskEncoder.from_pretrained(tmp_path / "mask_encoder")
    assert loaded.fmt.to_config() == DIGITS.to_config()
    assert torch.equal(loaded.encode_ids(ids), tokens)


@pytest.fixture(scope="module")
def text_conditioner() -> TextConditioner:
    from common.tiny import clip_tokenizer, tiny_clip_text

    return TextConditioner(clip_tokenizer(), tiny_clip_text(0))


def test_text_tokens_and_truncation_warning(text_conditioner):
    tokens = text_conditioner(["a red handwritten seven", "a blue handwritten one"])
    assert tokens.shape == (2, 77, 32)
    long_prompt = " ".join(["red"] * 100)
    with pytest.warns(UserWarning, match=r"is 102 tokens, over the text encoder's limit of 77: the last 25 tokens"):
        ids = text_conditioner.tokenize([long_prompt])
    assert ids.shape == (1, 77) and ids[0, -1] == text_conditioner.tokenizer.eos_token_id
    with pytest.raises(UserError, match="must be strings"):
        text_conditioner.tokenize([[1, 2, 3]])
