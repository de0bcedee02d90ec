"""The released Optimus text VAE (``optimus-vae.pth``) -> our :class:`OptimusVAE`, checked against the official network.

The reference below is a transcription, written for this test, of the official module structure of Versatile
Diffusion's ``optimus_vae_next`` (``BertForLatentConnector_XX`` + ``GPT2ForLatentConnector_XX``, both latent
injections on): the same module names (so its ``state_dict()`` is the released key set), the same forward
arithmetic (the memory slot concatenated into each layer's keys/values, the ``w * b - 1e4 (1 - b)`` causal mask,
tanh-GELU in GPT-2, erf-GELU in BERT, ``-10000`` padding mask) and the official tokenization / decoding loop.
Key sets are compared at the released sizes on the meta device; numbers at reduced width with random weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from script_loading import load_script, run_main
from torch import nn

from common.errors import UserError
from versatile.config import TextVAEConfig, VersatileConfig
from versatile.optimus_convert import (
    causal_mask_keys,
    convert_optimus_vae,
    export_optimus_state_dict,
    import_optimus_state_dict,
    load_bert_tokenizer,
    load_gpt2_tokenizer,
)
from versatile.text_vae import build_text_vae, clean_up_tokenization, load_text_vae, save_text_vae


REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


# --------------------------------------------------------------------------------------------------------------
# the official network, transcribed
# --------------------------------------------------------------------------------------------------------------


class Conv1D(nn.Module):
    """GPT-2's transposed linear: weight ``[in, out]``."""

    def __init__(self, nf, nx):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight).view(*x.shape[:-1], -1)


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


class Attention(nn.Module):
    def __init__(self, nx, n_ctx, cfg):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(n_ctx, n_ctx)).view(1, 1, n_ctx, n_ctx))
        self.n_head, self.split_size = cfg.n_head, nx
        self.c_attn = Conv1D(nx * 3, nx)
        self.c_proj = Conv1D(nx, nx)

    def split_heads(self, x, k=False):
        x = x.view(*x.shape[:-1], self.n_head, x.size(-1) // self.n_head)
        return x.permute(0, 2, 3, 1) if k else x.permute(0, 2, 1, 3)

    def forward(self, x, layer_past=None):
        query, key, value = self.c_attn(x).split(self.split_size, dim=2)
        query, key, value = self.split_heads(query), self.split_heads(key, k=True), self.split_heads(value)
        if layer_past is not None:
            past_key, past_value = self.split_heads(layer_past[0], k=True), self.split_heads(layer_past[1])
            key = torch.cat((past_key, key), dim=-1)
            value = torch.cat((past_value, value), dim=-2)
        w = torch.matmul(query, key) / math.sqrt(value.size(-1))
        nd, ns = w.size(-2), w.size(-1)
        b = self.bias[:, :, ns - nd : ns, :ns]
        w = torch.softmax(w * b - 1e4 * (1 - b), dim=-1)
        a = torch.matmul(w, value).permute(0, 2, 1, 3).contiguous()
        return self.c_proj(a.view(*a.shape[:-2], -1))


class MLP(nn.Module):
    def __init__(self, n_state, cfg):
        super().__init__()
        self.c_fc = Conv1D(n_state, cfg.n_embd)
        self.c_proj = Conv1D(cfg.n_embd, n_state)

    def forward(self, x):
        return self.c_proj(gelu_tanh(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, n_ctx, cfg):
        super().__init__()
        nx = cfg.n_embd
        self.ln_1 = nn.LayerNorm(nx, eps=1e-5)
        self.attn = Attention(nx, n_ctx, cfg)
        self.ln_2 = nn.LayerNorm(nx, eps=1e-5)
        self.mlp = MLP(4 * nx, cfg)

    def forward(self, x, layer_past=None):
        x = x + self.attn(self.ln_1(x), layer_past=layer_past)
        return x + self.mlp(self.ln_2(x))


class GPT2Model_XX(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.h = nn.ModuleList([Block(cfg.n_positions, cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=1e-5)
        self.linear = nn.Linear(cfg.latent_size, cfg.n_embd * cfg.n_layer, bias=False)
        self.linear_emb = nn.Linear(cfg.latent_size, cfg.n_embd, bias=False)

    def forward(self, input_ids, past):
        past_emb = self.linear_emb(past)  # latent_as_gpt_emb
        past_split = torch.split(self.linear(past).unsqueeze(1), self.config.n_embd, dim=2)  # latent_as_gpt_memory
        layer_pasts = list(zip(past_split, past_split))
        position_ids = torch.arange(1, input_ids.size(-1) + 1).unsqueeze(0).expand_as(input_ids)
        hidden = self.wte(input_ids) + self.wpe(position_ids) + past_emb.unsqueeze(1)
        for block, layer_past in zip(self.h, layer_pasts):
            hidden = block(hidden, layer_past=layer_past)
        return self.ln_f(hidden)


class GPT2ForLatentConnector_XX(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.transformer = GPT2Model_XX(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tie_weights

    def forward(self, input_ids, past):
        return self.lm_head(self.transformer(input_ids, past))


class BertEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(2, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=1e-12)

    def forward(self, input_ids):
        positions = torch.arange(input_ids.size(1)).unsqueeze(0).expand_as(input_ids)
        e = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        return self.LayerNorm(e + self.token_type_embeddings(torch.zeros_like(input_ids)))


class BertSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.heads, self.head_size = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
        self.query, self.key, self.value = (nn.Linear(cfg.hidden_size, cfg.hidden_size) for _ in range(3))

    def split(self, x):
        return x.view(*x.shape[:-1], self.heads, self.head_size).permute(0, 2, 1, 3)

    def forward(self, h, mask):
        q, k, v = self.split(self.query(h)), self.split(self.key(h)), self.split(self.value(h))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_size) + mask
        ctx = torch.matmul(torch.softmax(scores, dim=-1), v).permute(0, 2, 1, 3).contiguous()
        return ctx.view(*ctx.shape[:-2], -1)


class DenseLayerNorm(nn.Module):  # BertSelfOutput / BertOutput
    def __init__(self, n_in, cfg):
        super().__init__()
        self.dense = nn.Linear(n_in, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=1e-12)

    def forward(self, h, residual):
        return self.LayerNorm(self.dense(h) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = DenseLayerNorm(cfg.hidden_size, cfg)


class BertIntermediate(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)


class BertLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = DenseLayerNorm(cfg.intermediate_size, cfg)

    def forward(self, h, mask):
        a = self.attention.output(self.attention.self(h, mask), h)
        i = self.intermediate.dense(a)
        return self.output(i * 0.5 * (1.0 + torch.erf(i / math.sqrt(2.0))), a)


class BertEncoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(cfg) for _ in range(cfg.num_hidden_layers)])


class BertPooler(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)


class BertForLatentConnector_XX(nn.Module):
    def __init__(self, cfg, latent_size):
        super().__init__()
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)
        self.pooler = BertPooler(cfg)
        self.linear = nn.Linear(cfg.hidden_size, 2 * latent_size, bias=False)

    def forward(self, input_ids, attention_mask):
        mask = (1.0 - attention_mask[:, None, None, :]) * -10000.0
        h = self.embeddings(input_ids)
        for layer in self.encoder.layer:
            h = layer(h, mask)
        return h, torch.tanh(self.pooler.dense(h[:, 0]))


class OfficialOptimus(nn.Module):
    """``optimus_vae_next``'s parameters (``encoder``, ``decoder``) with its ``encode`` and decoding loop."""

    def __init__(self, hidden, enc_layers, dec_layers, heads, intermediate, enc_positions, dec_positions,
                 enc_vocab, dec_vocab, latent):
        super().__init__()
        self.encoder = BertForLatentConnector_XX(SimpleNamespace(
            vocab_size=enc_vocab, hidden_size=hidden, num_hidden_layers=enc_layers, num_attention_heads=heads,
            intermediate_size=intermediate, max_position_embeddings=enc_positions), latent)
        self.decoder = GPT2ForLatentConnector_XX(SimpleNamespace(
            vocab_size=dec_vocab, n_embd=hidden, n_layer=dec_layers, n_head=heads, n_positions=dec_positions,
            latent_size=latent))

    def encode(self, tokenizer, text, max_length=77):
        token = [tokenizer.tokenize(sentence.lower())[:max_length] for sentence in text]
        cls, sep = tokenizer.convert_tokens_to_ids(["[CLS]", "[SEP]"])
        ids = [torch.LongTensor([cls, *tokenizer.convert_tokens_to_ids(t), sep]) for t in token]
        ids = nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=0)
        pooled = self.encoder(ids, attention_mask=(ids > 0).float())[1]
        return self.encoder.linear(pooled).chunk(2, -1)[0]

    def greedy_ids(self, z, bos, eos, max_length=30):
        """``sample_single_sequence_conditional`` with argmax in place of the multinomial draw."""
        generated = torch.LongTensor([[bos]])
        while True:
            nxt = self.decoder(generated, past=z.unsqueeze(0))[0, -1].argmax()
            generated = torch.cat((generated, nxt.view(1, 1)), dim=1)
            if nxt.item() == eos:
                break
            if generated.shape[1] >= max_length:
                generated[0, -1] = eos
                break
        return generated[0].tolist()


# --------------------------------------------------------------------------------------------------------------
# tiny tokenizer files (the official vocabularies are large; these have the same formats)
# --------------------------------------------------------------------------------------------------------------

WORDS = ("a", "an", "the", "cat", "dog", "red", "blue", "on", "mat", "sits", "photo", "of", "##s", "##ing", "Cat")


def byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte (its byte-level BPE alphabet), in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def write_tokenizer_files(folder: Path, official_names: bool = True) -> Path:
    """A WordPiece vocab and a byte-level BPE vocab + merges, under the official (or the hub's) file names."""
    folder.mkdir(parents=True, exist_ok=True)
    bert = ["[PAD]", *(f"[unused{i}]" for i in range(3)), "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / ("bert-base-cased-vocab.txt" if official_names else "vocab.txt")).write_text("\n".join(bert) + "\n")
    vocab = {s: i for i, s in enumerate(byte_symbols())}
    merges = ["Ġ c", "Ġc a", "Ġca t", "Ġ r", "Ġr e", "Ġre d", "Ġ a"]
    for merge in merges:
        vocab[merge.replace(" ", "")] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    names = ("gpt2-vocab.json", "gpt2-merges.txt") if official_names else ("vocab.json", "merges.txt")
    (folder / names[0]).write_text(json.dumps(vocab))
    (folder / names[1]).write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


SMALL = dict(optimus_hidden_size=32, optimus_encoder_layers=2, optimus_decoder_layers=2, optimus_heads=4,
             optimus_intermediate_size=64, optimus_encoder_positions=96, optimus_decoder_positions=48)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return write_tokenizer_files(tmp_path_factory.mktemp("optimus_vocab"))


@pytest.fixture(scope="module")
def official(tokenizer_dir):
    """The official structure at reduced width with random weights, and our tokenizers."""
    bert, gpt2 = load_bert_tokenizer(tokenizer_dir), load_gpt2_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    ref = OfficialOptimus(32, 2, 2, 4, 64, 96, 48, len(bert), len(gpt2), latent=16).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "LayerNorm" in name or ".ln_" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1 if p.ndim > 1 else 0.05)
    return ref, bert, gpt2


def convert(ref, tokenizer_dir):
    return convert_optimus_vae(ref.state_dict(), tokenizer_dir, tokenizer_dir, TextVAEConfig(**SMALL), 16)


# --------------------------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------------------------


def test_decoded_text_is_cleaned_up_as_officially():
    assert clean_up_tokenization("a cat , sitting . i do not know it 's") == "a cat, sitting. i don't know it's"


def test_tokenizers_match_the_official_setup(tokenizer_dir, tmp_path):
    bert, gpt2 = load_bert_tokenizer(tokenizer_dir), load_gpt2_tokenizer(tokenizer_dir)
    ids = bert("the Cat sits")["input_ids"]
    assert bert.convert_ids_to_tokens(ids) == ["[CLS]", "the", "Cat", "sits", "[SEP]"]  # cased, as Optimus'
    base = 256 + 7 + 1
    assert (gpt2.pad_token_id, gpt2.bos_token_id, gpt2.eos_token_id, len(gpt2)) == (base, base + 1, base + 2, base + 3)
    assert gpt2.decode(gpt2(" a red cat")["input_ids"]) == " a red cat"
    hub = write_tokenizer_files(tmp_path / "hub", official_names=False)  # vocab.txt / vocab.json + merges.txt
    assert load_bert_tokenizer(hub)("the Cat")["input_ids"] == bert("the Cat")["input_ids"]
    assert len(load_gpt2_tokenizer(hub)) == len(gpt2)
    with pytest.raises(UserError, match="vocab.txt"):
        load_bert_tokenizer(tmp_path)
    with pytest.raises(UserError, match="merges.txt"):
        load_gpt2_tokenizer(tmp_path)


def test_released_key_set_on_meta():
    """At the released sizes: 363 official keys = our 351 tensors (3 renamed) + 12 causal masks."""
    paper = VersatileConfig.load("paper")
    tv = paper.text_vae
    with torch.device("meta"):
        ref = OfficialOptimus(768, 12, 12, 12, 3072, 512, 1024, 28996, 50260, latent=768)
    released = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert len(released) == 363
    ours = build_text_vae(tv, paper.diffuser.text_latent_dim, tokenizers=(None, None), device="meta")
    assert len(ours.state_dict()) == 351
    exported = {k: tuple(v.shape) for k, v in export_optimus_state_dict(ours).items()}
    assert exported == released
    assert released["encoder.embeddings.word_embeddings.weight"] == (28996, 768)
    assert released["decoder.lm_head.weight"] == (50260, 768)
    assert released["decoder.transformer.linear.weight"] == (768 * 12, 768)
    assert released["decoder.transformer.h.11.attn.bias"] == (1, 1, 1024, 1024)
    imported = import_optimus_state_dict(ref.state_dict(), ours)
    assert set(imported) == set(ours.state_dict()) and len(set(released) - set(imported)) == 15
    assert sorted(set(released) - set(imported) - set(causal_mask_keys(12))) == [
        "decoder.transformer.linear.weight", "decoder.transformer.linear_emb.weight", "encoder.linear.weight"]


def test_converted_vae_reproduces_the_official_encoder_and_decoder(official, tokenizer_dir):
    ref, bert, gpt2 = official
    ours = convert(ref, tokenizer_dir)
    texts = ["The red Cat sits on the mat", "a dog", "photo of a blue dog " * 25]  # the last one exceeds 77 pieces
    assert len(bert.tokenize(texts[2])) > 77
    with torch.no_grad():
        expected = ref.encode(bert, texts)
        got = ours.encode(texts)
        assert got.shape == (3, 16) and expected.abs().max() > 0.1
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        z = torch.randn(2, 16, generator=torch.Generator().manual_seed(1))
        ids = torch.tensor([[gpt2.bos_token_id, 5, 70, 263, 100, 9], [gpt2.bos_token_id, 263, 263, 40, 41, 42]])
        expected_logits = ref.decoder(ids, past=z)
        torch.testing.assert_close(ours.logits(z, ids), expected_logits, atol=1e-5, rtol=1e-5)
        # the latent matters through both injections: zeroing either one changes the logits
        for name in ("latent_to_memory", "latent_to_embedding"):
            saved = getattr(ours, name).weight.clone()
            getattr(ours, name).weight.zero_()
            assert (ours.logits(z, ids) - expected_logits).abs().max() > 1e-3
            getattr(ours, name).weight.copy_(saved)
    # greedy decoding: the official loop (whole prefix re-run each step) == our cached, batched decoding
    for row in range(2):
        ids = ref.greedy_ids(z[row], gpt2.bos_token_id, gpt2.eos_token_id)
        body = ids[1 : ids.index(gpt2.eos_token_id, 1)]
        text = " ".join(clean_up_tokenization(gpt2.decode(body, skip_special_tokens=True)).split())
        assert ours.decode(z[row : row + 1], temperature=0)[0] == text


def test_round_trip_is_bit_exact(official, tokenizer_dir, tmp_path):
    ref, _, _ = official
    ours = convert(ref, tokenizer_dir)
    exported = export_optimus_state_dict(ours)
    assert set(exported) == set(ref.state_dict())
    for key, tensor in ref.state_dict().items():
        assert torch.equal(exported[key], tensor) and exported[key].dtype == tensor.dtype, key
    back = import_optimus_state_dict(exported, ours)
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())
    # through the file formats: released .pth -> converter -> our safetensors folder -> loaded
    torch.save(exported, tmp_path / "optimus-vae.pth")
    again = convert_optimus_vae(tmp_path / "optimus-vae.pth", tokenizer_dir, tokenizer_dir, TextVAEConfig(**SMALL), 16)
    save_text_vae(again, tmp_path / "ours")
    loaded = load_text_vae(tmp_path / "ours")
    for key, tensor in ours.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    assert loaded.decoder.lm_head.weight.data_ptr() == loaded.decoder.transformer.wte.weight.data_ptr()
    texts = ["the red Cat", "a dog sits"]
    assert torch.equal(loaded.encode(texts), ours.encode(texts))
    assert loaded.encoder_tokenizer("the Cat")["input_ids"] == ours.encoder_tokenizer("the Cat")["input_ids"]
    assert loaded.bos_id == ours.bos_id and loaded.eos_id == ours.eos_id and loaded.pad_id == ours.pad_id


def test_bad_checkpoints_are_one_line_errors(official, tokenizer_dir, tmp_path):
    ref, _, _ = official
    good = ref.state_dict()

    def error(state) -> str:
        with pytest.raises(UserError) as info:
            convert_optimus_vae(state, tokenizer_dir, tokenizer_dir, TextVAEConfig(**SMALL), 16)
        assert "\n" not in str(info.value)
        return str(info.value)

    assert "decoder.transformer.linear_emb.weight" in error(
        {k: v for k, v in good.items() if k != "decoder.transformer.linear_emb.weight"})
    assert "decoder.transformer.h.1.attn.bias" in error(
        {k: v for k, v in good.items() if k != "decoder.transformer.h.1.attn.bias"})
    assert "encoder.cls.weight" in error({**good, "encoder.cls.weight": torch.zeros(1)})
    shaped = error({**good, "encoder.embeddings.word_embeddings.weight": torch.zeros(7, 32)})
    assert "encoder.embeddings.word_embeddings.weight" in shaped and "[7, 32]" in shaped and "tokenizer" in shaped
    assert "causal mask" in error({**good, "decoder.transformer.h.0.attn.bias": torch.ones(1, 1, 48, 48)})
    untied = {**good, "decoder.lm_head.weight": good["decoder.lm_head.weight"] + 1}
    assert "ties" in error(untied)
    assert "latent" in error({**good, "encoder.linear.weight": torch.zeros(20, 32)})
    # a pickle that would run code is refused by weights_only=True before anything runs
    torch.save({"state_dict": good, "note": SimpleNamespace(a=1)}, tmp_path / "pickled.pth")
    assert "pickled Python objects" in error(tmp_path / "pickled.pth")


# --------------------------------------------------------------------------------------------------------------
# scripts: convert, then sample the text flows from the converted folder
# --------------------------------------------------------------------------------------------------------------

convert_script = load_script("scripts/versatile/convert.py")
sample_script = load_script("scripts/versatile/sample.py")



def test_convert_script_and_text_flows_from_the_released_layout(tokenizer_dir, tmp_path, capsys):
    from versatile.convert import export_state_dict
    from versatile.tiny import tiny_diffuser

    digits = VersatileConfig.load("digits")  # the sizes of the shipped tiny image VAE and CLIP
    tokenizers = (load_bert_tokenizer(tokenizer_dir), load_gpt2_tokenizer(tokenizer_dir))
    released_vae = build_text_vae(digits.text_vae, digits.diffuser.text_latent_dim, tokenizers=tokenizers, seed=5)
    torch.save(export_optimus_state_dict(released_vae), tmp_path / "optimus-vae.pth")
    diffuser = tiny_diffuser(seed=3, config=digits, zero_init=False)
    torch.save(export_state_dict(diffuser, "vd-r1"), tmp_path / "vd.pth")
    towers = {"vae": REPO / "ckpt/tiny/vae", "clip": REPO / "ckpt/tiny/clip", "text_vae": REPO / "ckpt/tiny/versatile/text_vae"}
    optimus = ["--optimus_vae", tmp_path / "optimus-vae.pth", "--bert_tokenizer", tokenizer_dir,
               "--gpt2_tokenizer", tokenizer_dir, "--model_config", "digits"]

    code, _ = run_main(convert_script.main, [*optimus, "--dst", tmp_path / "text_vae"], capsys)
    assert code == 0
    alone = load_text_vae(tmp_path / "text_vae")
    assert all(torch.equal(alone.state_dict()[k], v) for k, v in released_vae.state_dict().items())

    folder = tmp_path / "vd"
    code, _ = run_main(convert_script.main, [*optimus, "--from", "vd-r1", "--src", tmp_path / "vd.pth", "--dst",
                                             folder, "--image_vae", towers["vae"], "--clip", towers["clip"]], capsys)
    assert code == 0 and json.loads((folder / "versatile.json").read_text())["text_vae"] == "text_vae"
    inside = load_text_vae(folder / "text_vae")
    assert all(torch.equal(inside.state_dict()[k], v) for k, v in released_vae.state_dict().items())
    image = tmp_path / "img.png"
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    for flow, extra in (("i2t", ["--image", image]), ("t2t", ["--prompt", "the red Cat sits"])):
        out = tmp_path / f"out_{flow}"
        code, err = run_main(sample_script.main, ["--checkpoint", folder, "--flow", flow, "--num_inference_steps", 2,
                                                  "--text_temperature", 0, "--output_dir", out, "--no_progress",
                                                  *extra], capsys)
        assert code == 0, err
        rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
        assert len(rows) == 1 and isinstance(rows[0]["text"], str)

    # bad input: one line, exit 2, nothing written
    broken = {k: v for k, v in export_optimus_state_dict(released_vae).items() if k != "encoder.linear.weight"}
    torch.save(broken, tmp_path / "broken.pth")
    cases = [
        ([*optimus[:2], "--model_config", "digits"], "--bert_tokenizer and --gpt2_tokenizer"),
        (["--optimus_vae", tmp_path / "broken.pth", *optimus[2:]], "encoder.linear.weight"),
        ([*optimus, "--text_vae", towers["text_vae"]], "pass the text VAE once"),
        ([*optimus, "--src", tmp_path / "vd.pth"], "--image_vae and --clip"),
        (["--bert_tokenizer", tokenizer_dir, "--src", tmp_path / "vd.pth"], "go with --optimus_vae"),
        ([*optimus[:4], "--gpt2_tokenizer", tmp_path, "--model_config", "digits"], "merges.txt"),
    ]
    for argv, message in cases:
        code, err = run_main(convert_script.main, [*argv, "--dst", tmp_path / "never"], capsys)
        assert code == 2 and len(err) == 1 and message in err[0], err
        assert not (tmp_path / "never").exists()
