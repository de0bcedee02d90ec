import open_clip
import torch

from common.clip_convert import open_clip_text_to_transformers


def tiny_open_clip(quick_gelu=False):
    torch.manual_seed(0)
    cfg = dict(embed_dim=32, quick_gelu=quick_gelu,
               vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=8, head_width=16),
               text_cfg=dict(context_length=77, vocab_size=49408, width=48, heads=3, layers=2))
    return open_clip.model.CLIP(**cfg).eval()


def test_converted_text_tower_matches_open_clip():
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    ids = tokenizer(["a red handwritten seven", "the digit 3 written in blue", ""])
    for quick in (False, True):
        model = tiny_open_clip(quick)
        hf = open_clip_text_to_transformers(model)
        with torch.no_grad():
            ref_embeds = model.encode_text(ids)
            out = hf(ids)
            # open_clip's last hidden states (ln_final of the transformer output)
            x = model.token_embedding(ids) + model.positional_embedding
            x = model.transformer(x, attn_mask=model.attn_mask)
            ref_hidden = model.ln_final(x)
        assert torch.allclose(out.text_embeds, ref_embeds, atol=1e-5)
        assert torch.allclose(out.last_hidden_state, ref_hidden, atol=1e-5)
