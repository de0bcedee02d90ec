"""Multi-CLIP embeddings, text states, the offline cache, and text -> embedding end to end."""

import pytest
import torch
from PIL import Image

from common.errors import UserError
from common.tiny import t5_tokenizer, tiny_open_clip, tiny_t5_encoder
from shifted.bank import fit_bank
from shifted.embeddings import (
    OPENAI_MEAN,
    OPENAI_STD,
    EmbeddingDataset,
    MultiCLIP,
    PriorTextEncoder,
    TextStates,
    extract_embeddings,
    load_embedding_cache,
    mean_block_cosine,
    per_block_cosine,
    save_embedding_cache,
    to_pixels,
)
from shifted.pipeline import null_image_embedding, sample_prior_from_texts
from shifted.prior import ShiftedPrior


NAMES = ("tiny-open-clip-0", "tiny-open-clip-1", "tiny-open-clip-2")
CAPTIONS = ["a red handwritten seven", "a blue handwritten two", "a green handwritten zero", "a red one"]


@pytest.fixture(scope="module")
def clip():
    import open_clip

    tokenizer = open_clip.tokenizer.SimpleTokenizer()
    return MultiCLIP([(name, tiny_open_clip(seed), tokenizer) for seed, name in enumerate(NAMES)])


@pytest.fixture(scope="module")
def text_encoder(clip):
    return PriorTextEncoder(clip, TextStates(tiny_t5_encoder(), t5_tokenizer(), "tiny-t5", max_length=8))


def images(n=4, size=(32, 32), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).byte().numpy()) for _ in range(n)]


def test_blocks_are_each_models_raw_embedding_in_the_fixed_order(clip):
    assert clip.names == NAMES and clip.block_dims == (64, 64, 64) and clip.dim == 192
    pixels = to_pixels(images(2))
    emb = clip.encode_image(pixels)
    mean, std = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    text = clip.encode_text(CAPTIONS[:2])
    for i, (_, model, tokenizer) in enumerate(clip.models):  # 32x32 inputs need no resize: plain CLIP normalise
        block = slice(64 * i, 64 * (i + 1))
        assert torch.allclose(emb[:, block], model.encode_image((pixels - mean) / std), atol=1e-5)
        assert torch.allclose(text[:, block], model.encode_text(tokenizer(CAPTIONS[:2])), atol=1e-5)
    assert not torch.allclose(emb[:, :64], emb[:, 64:128])  # three different models, not one repeated
    assert emb.norm(dim=1).min() > 1.5  # raw, not L2-normalised
    wide = clip.encode_image(to_pixels(images(2, size=(48, 40))))  # non-square: short-side resize + centre crop
    assert wide.shape == (2, 192) and bool(torch.isfinite(wide).all())


def test_similarity_is_per_block_then_averaged_not_on_the_concatenation():
    dims = (4, 4, 2)
    a = torch.tensor([[10.0, 0, 0, 0, 1, 0, 0, 0, 1, 0]])
    b = torch.tensor([[10.0, 0, 0, 0, 0, 1, 0, 0, 0, 1]])
    assert torch.allclose(per_block_cosine(a, b, dims), torch.tensor([[1.0, 0.0, 0.0]]))
    assert float(mean_block_cosine(a, b, dims)) == pytest.approx(1 / 3)
    assert float(torch.cosine_similarity(a, b)) == pytest.approx(100 / 102)  # the concatenation: dominated by block 0
    assert torch.allclose(per_block_cosine(a, 3 * a, dims), torch.ones(1, 3))


def test_cache_equals_on_the_fly_embeddings_and_knows_its_models(clip, text_encoder, tmp_path):
    pics = images(5, seed=1)
    captions = CAPTIONS + ["a blue nine"]
    tensors = extract_embeddings(clip, pics, captions, text_encoder.text_states, batch_size=2)
    assert tensors["image_emb"].shape == (5, 192) and tensors["text_states"].shape == (5, 8, 32)
    path = save_embedding_cache(tmp_path / "emb.safetensors", tensors, clip, captions, "tiny-t5")
    loaded, meta = load_embedding_cache(path, clip_models=NAMES, texts=captions)
    assert meta["clip_models"] == list(NAMES) and meta["block_dims"] == [64, 64, 64] and meta["count"] == 5
    for key in tensors:
        assert torch.equal(loaded[key], tensors[key])
    dataset = EmbeddingDataset(loaded)  # what the shared trainer batches (default collate)
    batch = torch.utils.data.default_collate([dataset[i] for i in (4, 0)])
    assert len(dataset) == 5 and torch.equal(batch["text_states"], tensors["text_states"][[4, 0]])
    on_the_fly = clip.encode_image(to_pixels(pics))  # one batch of 5 instead of 2 + 2 + 1
    assert torch.allclose(loaded["image_emb"], on_the_fly, atol=1e-5)
    clip_text, states = text_encoder(captions)
    assert torch.allclose(loaded["text_emb"], clip_text, atol=1e-5)
    assert torch.allclose(loaded["text_states"], states, atol=1e-5)
    with pytest.raises(UserError, match="CLIP models"):
        load_embedding_cache(path, clip_models=("ViT-B-16/openai", "ViT-B-32/openai", "RN101/openai"))
    with pytest.raises(UserError, match="other captions"):
        load_embedding_cache(path, texts=captions[::-1])
    with pytest.raises(UserError, match="paired one to one"):
        extract_embeddings(clip, pics, captions[:3])


def test_text_states_are_padded_unmasked_and_the_null_is_zeros(text_encoder):
    states = text_encoder.text_states(["a red handwritten seven", "a"])
    assert states.shape == (2, 8, 32)
    assert not torch.allclose(states[1, -1], torch.zeros(32))  # padding positions carry encoder states (no mask)
    null = TextStates.null(states)
    assert torch.equal(null, torch.zeros_like(states)) and null.data_ptr() != states.data_ptr()


def test_captions_to_embeddings_end_to_end_and_bad_input(clip, text_encoder):
    torch.manual_seed(0)
    prior = ShiftedPrior(emb_dim=192, text_dim=32, text_len=8, width=32, layers=1, heads=2, dim_head=16,
                         clip_models=list(NAMES), clip_dims=[64, 64, 64], text_encoder="tiny-t5").eval()
    bank = fit_bank(clip.encode_image(to_pixels(images(12, seed=2))), 2, clip_models=NAMES, block_dims=(64, 64, 64))
    out = sample_prior_from_texts(prior, bank, text_encoder, CAPTIONS[:2], generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 192) and bool(torch.isfinite(out).all())
    null = null_image_embedding(prior, bank, text_encoder, generator=torch.Generator().manual_seed(0))
    assert null.shape == (192,)
    other_clip = PriorTextEncoder(MultiCLIP(list(reversed(clip.models))), text_encoder.text_states)
    states = text_encoder.text_states
    other_t5 = PriorTextEncoder(clip, TextStates(states.encoder, states.tokenizer, "t5-11b", 8))
    small_bank = fit_bank(torch.randn(20, 128), 2, clip_models=NAMES[:2], block_dims=(64, 64))
    cases = [
        (lambda: sample_prior_from_texts(prior, bank, text_encoder, [""]), "caption 0 is empty"),
        (lambda: sample_prior_from_texts(prior, bank, text_encoder, ["a cat", "   "]), "caption 1 is empty"),
        (lambda: sample_prior_from_texts(prior, bank, text_encoder, []), "no text"),
        (lambda: sample_prior_from_texts(prior, bank, other_clip, ["a cat"]), "CLIP models"),
        (lambda: sample_prior_from_texts(prior, bank, other_t5, ["a cat"]), "tiny-t5 text states but t5-11b"),
        (lambda: sample_prior_from_texts(prior, small_bank, text_encoder, ["a cat"]), "128-dimensional"),
    ]
    for call, match in cases:
        with pytest.raises(UserError, match=match) as err:
            call()
        assert "\n" not in str(err.value)
