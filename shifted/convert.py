"""Reading the files the Shifted Diffusion authors released into the project's objects.

The release (drboog/Shifted_Diffusion, its README's download links) has:

- ``model_state.th``: ``ClipPrior.state_dict()`` saved with ``torch.save`` (16 layers "small", 20 "large"; width
  2048, 32 heads, 1536-d embeddings, T5-11B states of width 1024, a bank of 1024 Gaussians). Its transformer is an
  x-transformers 0.28.4 ``Decoder``; :func:`released_to_project` renames its keys to :class:`ShiftedPrior`'s.
- ``mean.pth`` / ``std.pth``: the bank, one tensor each, read as ``view(-1, 1536)[:1024]`` (std, not log std);
  :func:`load_released_bank`.
- ``*_empty_embeds.th``: the prior's sample for the empty caption, ``[1, 1536]`` float32, the decoder's CFG null;
  :func:`load_released_empty_embedding`.
- the fine-tuned Stable Diffusion 2 folder: a ``save_pretrained`` folder of the authors' forked diffusers
  (0.15.0.dev0): ``StableDiffusionPipelineWithCLIP`` whose UNet (``UNet2DConditionModelEmb``) carries the image
  projection ``emb_proj_layers`` inside; :func:`convert_released_decoder` splits it into a plain diffusers
  pipeline folder plus the project's ``image_projection/``.

Every ``.th`` / ``.pth`` / ``.bin`` file is read with ``torch.load(weights_only=True)`` (:func:`common.io.
safe_torch_load`): plain tensors only, no code. Every key is accounted for: a missing, unexpected or mis-shaped
one is a :class:`UserError` naming it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional, Union

import torch

from common.errors import UserError
from common.io import read_json_object
from shifted.bank import GaussianBank
from shifted.prior import ShiftedPrior


PathLike = Union[str, Path]

# The released checkpoints' sizes (sft_test.py): what the converter assumes where the weights do not tell.
RELEASED_HEADS = 32
RELEASED_TEXT_LEN = 80  # T5 states padded to 80 tokens
RELEASED_BANK_SIZE = 1024
RELEASED_STD_SCALE = 5.0
RELEASED_CLIP_DIMS = (512, 512, 512)  # ViT-B/16, ViT-B/32, RN101, concatenated in this order

# ClipPrior's own LayerNorm keeps its bias as an all-zero buffer ``beta``; the project's LayerNorm has no bias.
_LAYER_NORMS = ("t5_proj.0", "t5_proj.3", "x_proj.2", "clip_sentence_proj.2")
_FIXED = {"final_emb": "query"}
_PREFIXES = (("pos_embed.", "index_embed."),)
_BLOCK_PARTS = {  # (released sub-layer 0 = attention, 1 = feed-forward; suffix) -> the project's PriorBlock suffix
    (0, "0.0.g"): "attn_norm.g",
    (0, "1.to_q.weight"): "attn.to_q.weight",
    (0, "1.to_k.weight"): "attn.to_k.weight",
    (0, "1.to_v.weight"): "attn.to_v.weight",
    (0, "1.to_out.weight"): "attn.to_out.weight",
    (1, "0.0.g"): "ff_norm.g",
    (1, "1.net.0.proj.weight"): "ff.proj_in.weight",
    (1, "1.net.0.proj.bias"): "ff.proj_in.bias",
    (1, "1.net.3.weight"): "ff.proj_out.weight",
    (1, "1.net.3.bias"): "ff.proj_out.bias",
}
_BLOCK_KEY = re.compile(r"transformer\.layers\.(\d+)\.(.+)")
_PROJECT_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")


# --------------------------------------------------------------------------------------------------- prior keys


def _rename_released(key: str) -> Optional[str]:
    """The project's key for one released key, or None when it is not part of ``ClipPrior``."""
    if key in _FIXED:
        return _FIXED[key]
    match = _BLOCK_KEY.fullmatch(key)
    if match:
        index, rest = int(match.group(1)), match.group(2)
        part = _BLOCK_PARTS.get((index % 2, rest))
        return None if part is None else f"blocks.{index // 2}.{part}"
    for layer_norm in _LAYER_NORMS:
        if key == f"{layer_norm}.gamma":
            return f"{layer_norm}.weight"
    for released, project in _PREFIXES:
        if key.startswith(released):
            return project + key[len(released):]
    if key.split(".")[0] in ("t5_proj", "x_proj", "clip_sentence_proj", "time_embed", "out_proj"):
        return key
    return None


def released_to_project(state_dict: Mapping[str, torch.Tensor], source: str = "the checkpoint") -> dict:
    """Rename a released ``ClipPrior`` state dict to :class:`ShiftedPrior` keys (values untouched, no copy).

    Drops the four LayerNorm ``beta`` buffers after checking they are zero (the project's LayerNorm has no
    bias); any key that is not part of ``ClipPrior`` is a :class:`UserError` naming it.
    """
    out = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise UserError(f"{source}: entry {key!r} is not a tensor: pass a ClipPrior state_dict (model_state.th)")
        if key in {f"{n}.beta" for n in _LAYER_NORMS}:
            if not value.is_meta and bool(value.ne(0).any()):  # meta: a key-set check, no values
                raise UserError(f"{source}: LayerNorm bias {key} is not zero; the released ClipPrior keeps it zero "
                                "and the project's prior has none: this is not a released checkpoint")
            continue
        new = _rename_released(key)
        if new is None:
            hint = " (a learnable bank: convert its mean/std files instead)" if key.startswith("vocab.") else ""
            raise UserError(f"{source}: unexpected key {key}{hint}: not part of the released ClipPrior")
        if new in out:
            raise UserError(f"{source}: unexpected key {key}: a second tensor for {new}")
        out[new] = value
    return out


def project_to_released(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """The inverse of :func:`released_to_project`: a :class:`ShiftedPrior` state dict in ``ClipPrior`` layout
    (zero ``beta`` buffers added). Refuses a prior with attention output biases, which ``ClipPrior`` lacks."""
    inverse_parts = {v: k for k, v in _BLOCK_PARTS.items()}
    inverse_fixed = {v: k for k, v in _FIXED.items()}
    out = {}
    for key, value in state_dict.items():
        match = _PROJECT_BLOCK_KEY.fullmatch(key)
        if key in inverse_fixed:
            new = inverse_fixed[key]
        elif match:
            part = inverse_parts.get(match.group(2))
            if part is None:
                raise UserError(f"{key} has no place in the released ClipPrior (a prior with attn_out_bias=True)")
            new = f"transformer.layers.{2 * int(match.group(1)) + part[0]}.{part[1]}"
        elif key.startswith("index_embed."):
            new = "pos_embed." + key[len("index_embed."):]
        elif key.endswith(".weight") and key[: -len(".weight")] in _LAYER_NORMS:
            new = key[: -len(".weight")] + ".gamma"
            out[key[: -len(".weight")] + ".beta"] = torch.zeros_like(value)
        else:
            new = key
        out[new] = value
    return out


def released_prior_config(state_dict: Mapping[str, torch.Tensor], heads: int = RELEASED_HEADS, **config) -> dict:
    """:class:`ShiftedPrior` arguments read off a released state dict's shapes (``heads`` and the names, text
    length, CLIP widths and schedule come from ``config``: the weights do not record them)."""
    def shape(key):
        if key not in state_dict:
            raise UserError(f"the checkpoint lacks {key}: pass a ClipPrior state_dict (model_state.th)")
        return tuple(state_dict[key].shape)

    width = shape("final_emb")[-1]
    emb_dim = shape("x_proj.0.weight")[1]
    if shape("out_proj.2.weight")[0] != emb_dim:
        raise UserError(f"the checkpoint's out_proj gives {shape('out_proj.2.weight')[0]} values for a {emb_dim}-d "
                        "embedding (a learn_sigma prior): only x0-predicting priors are supported")
    layers = len({int(m.group(1)) for m in map(_BLOCK_KEY.fullmatch, state_dict) if m})
    if layers == 0 or layers % 2:
        raise UserError(f"the checkpoint holds {layers} transformer sub-layers: a ClipPrior has attention and "
                        "feed-forward pairs")
    inner = shape("transformer.layers.0.1.to_q.weight")[0]
    if inner % heads:
        raise UserError(f"--heads {heads} does not divide the attention width {inner}")
    clip_dims = config.pop("clip_dims", None)
    if clip_dims is None:  # the release concatenates CLIP models of one width
        count = max(len(config.get("clip_models") or ()), 1)
        if emb_dim % count:
            raise UserError(f"the {emb_dim}-d embedding does not split evenly over {count} CLIP models: pass one "
                            "--clip per CLIP model of the release (three: ViT-B/16, ViT-B/32, RN101)")
        clip_dims = [emb_dim // count] * count
    return dict(
        emb_dim=emb_dim,
        text_dim=shape("t5_proj.0.gamma")[0],
        text_len=int(config.pop("text_len", RELEASED_TEXT_LEN)),
        width=width,
        layers=layers // 2,
        heads=heads,
        dim_head=inner // heads,
        ff_mult=shape("transformer.layers.1.1.net.3.weight")[1] // width,
        use_bank_token="pos_embed.0.weight" in state_dict,
        clip_dims=list(clip_dims),
        attn_out_bias=False,
        **config,
    )


def load_state_into(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """``module.load_state_dict`` that names the first missing, unexpected or mis-shaped key in one line; values
    are cast to the module's dtype (the release may be half precision)."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing:
        raise UserError(f"{source} lacks {missing[0]} ({len(missing)} missing in all): not the expected network")
    if unexpected:
        raise UserError(f"{source} has an unexpected key {unexpected[0]} ({len(unexpected)} in all)")
    for key, value in state_dict.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise UserError(f"{source}: {key} has shape {tuple(value.shape)}, the network expects "
                            f"{tuple(expected[key].shape)}")
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state_dict.items()}, strict=True, assign=True)


def load_released_prior(
    path: PathLike,
    *,
    clip_models: Sequence[str],
    text_encoder: str,
    heads: int = RELEASED_HEADS,
    text_len: int = RELEASED_TEXT_LEN,
    clip_dims: Optional[Sequence[int]] = None,
) -> ShiftedPrior:
    """A float32 :class:`ShiftedPrior` holding a released ``model_state.th`` (or any ``ClipPrior`` state dict).

    ``clip_models`` / ``text_encoder``: the names of the CLIP models (ViT-B/16, ViT-B/32, RN101 in this order)
    and the text encoder (T5-11B) as this project names local folders (:func:`shifted.checkpoint.model_name`).
    The schedule is the release's: linear betas 1e-4 .. 0.02 over 1000 steps.
    """
    from common.io import safe_torch_load

    state = safe_torch_load(path)
    if not isinstance(state, Mapping):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state dict: pass model_state.th")
    config = released_prior_config(state, heads, text_len=text_len, clip_dims=clip_dims,
                                   clip_models=list(clip_models), text_encoder=str(text_encoder))
    renamed = released_to_project(state, str(path))
    with torch.device("meta"):
        prior = ShiftedPrior(**config)
    load_state_into(prior, renamed, str(path))
    return prior.float().eval()


# --------------------------------------------------------------------------------------- bank and null embedding


def _read_tensor(path: PathLike, what: str) -> torch.Tensor:
    from common.io import safe_torch_load

    value = safe_torch_load(path)
    if not isinstance(value, torch.Tensor):
        raise UserError(f"{path} holds a {type(value).__name__}, not one tensor: pass the released {what} file")
    return value.float()


def load_released_bank(
    mean_path: PathLike,
    std_path: PathLike,
    *,
    dim: int,
    size: int = RELEASED_BANK_SIZE,
    std_scale: float = RELEASED_STD_SCALE,
    clip_models: Sequence[str] = (),
    block_dims: Optional[Sequence[int]] = None,
) -> GaussianBank:
    """The released ``mean.pth`` / ``std.pth`` as a :class:`GaussianBank`, read as the reference reads them:
    ``view(-1, dim)[:size]``, std as standard deviations, compared with the text embedding by the cosine on the
    whole concatenation."""
    tensors = {}
    for name, path in (("mean", mean_path), ("std", std_path)):
        value = _read_tensor(path, name)
        if value.numel() % dim:
            raise UserError(f"{path} holds {value.numel()} values, not a whole number of {dim}-d rows")
        value = value.reshape(-1, dim)
        if value.shape[0] < size:
            raise UserError(f"{path} holds {value.shape[0]} rows, fewer than the bank size {size}: pass --bank_size")
        tensors[name] = value[:size]
    return GaussianBank(tensors["mean"], tensors["std"], std_scale, clip_models=clip_models,
                        block_dims=block_dims, similarity="concat")


def load_released_empty_embedding(path: PathLike, dim: int) -> torch.Tensor:
    """A released ``*_empty_embeds.th`` (``[1, D]``) as a ``[D]`` float32 tensor."""
    value = _read_tensor(path, "empty-embedding")
    if value.numel() != dim:
        raise UserError(f"{path} holds {tuple(value.shape)} values, not one {dim}-d embedding")
    return value.reshape(dim)


# ---------------------------------------------------------------------------------------------- the SD folder

RELEASED_UNET_CLASS = "UNet2DConditionModelEmb"
RELEASED_PIPELINE_CLASS = "StableDiffusionPipelineWithCLIP"
# Config fields the fork's UNet adds to UNet2DConditionModel (its projection Linear(input_dim, emb_dim * proj_n)).
_UNET_EXTRA_CONFIG = ("emb_dim", "proj_n", "input_dim")
_PROJECTION = "emb_proj_layers"
# diffusers before 0.16 named the VAE's attention layers query/key/value/proj_attn.
_OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_OLD_ATTENTION_KEY = re.compile(r"(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)")


def _read_json(path: Path) -> dict:
    return read_json_object(path, "config", "pass the released fine-tuned Stable Diffusion folder")


def _read_weights(folder: Path, stem: str) -> dict:
    from common.io import load_safetensors, safe_torch_load

    for suffix in (".safetensors", ".bin"):
        path = folder / f"{stem}{suffix}"
        if path.is_file():
            state = load_safetensors(path) if suffix == ".safetensors" else safe_torch_load(path)
            if not isinstance(state, Mapping):
                raise UserError(f"{path} is not a state dict")
            return dict(state)
    raise UserError(f"{folder} holds no {stem}.safetensors or {stem}.bin")


def _rename_old_attention(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        match = _OLD_ATTENTION_KEY.fullmatch(key)
        if match:
            key = f"{match.group(1)}.{_OLD_ATTENTION[match.group(2)]}.{match.group(3)}"
        out[key] = value
    return out


def _diffusers_model(cls, folder: Path, weights_stem: str, drop_config=(), rename=None):
    config = {k: v for k, v in _read_json(folder / "config.json").items() if k not in drop_config}
    state = _read_weights(folder, weights_stem)
    if rename is not None:
        state = rename(state)
    with torch.device("meta"):
        model = cls.from_config(config)
    load_state_into(model, state, str(folder))
    return model.float().eval(), state


def read_released_decoder(folder: PathLike):
    """``(unet, vae, projection, scheduler)`` from the released SD folder; the UNet a stock
    ``UNet2DConditionModel`` and the projection an :class:`~shifted.projection.ImageEmbProjection` holding
    ``emb_proj_layers``. Plain diffusers SD folders (no ``emb_proj_layers``) are refused with a pointer."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from shifted.projection import ImageEmbProjection

    folder = Path(folder)
    index = _read_json(folder / "model_index.json")
    unet_config = _read_json(folder / "unet" / "config.json")
    if unet_config.get("_class_name") != RELEASED_UNET_CLASS or not all(k in unet_config for k in _UNET_EXTRA_CONFIG):
        raise UserError(
            f"{folder}/unet is a {unet_config.get('_class_name')}, not the release's {RELEASED_UNET_CLASS} (with "
            f"{', '.join(_UNET_EXTRA_CONFIG)}): pass the authors' fine-tuned folder (model_index.json names "
            f"{RELEASED_PIPELINE_CLASS}; this one names {index.get('_class_name')})")
    unet_state = _read_weights(folder / "unet", "diffusion_pytorch_model")
    projection_state = {k[len(_PROJECTION) + 1:]: unet_state.pop(k) for k in list(unet_state)
                        if k.startswith(_PROJECTION + ".")}
    config = {k: v for k, v in unet_config.items() if k not in _UNET_EXTRA_CONFIG}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        projection = ImageEmbProjection(in_dim=int(unet_config["input_dim"]), n_tokens=int(unet_config["proj_n"]),
                                        cross_attention_dim=int(unet_config["emb_dim"]))
    if int(unet_config["emb_dim"]) != unet.config.cross_attention_dim:
        raise UserError(f"{folder}/unet: emb_dim {unet_config['emb_dim']} is not the UNet's cross_attention_dim "
                        f"{unet.config.cross_attention_dim}")
    load_state_into(unet, unet_state, f"{folder}/unet")
    projection_state = {f"proj.{k}": v for k, v in projection_state.items()}
    projection_state["null_embedding"] = torch.zeros(int(unet_config["input_dim"]))
    load_state_into(projection, projection_state, f"{folder}/unet ({_PROJECTION})")
    vae, _ = _diffusers_model(AutoencoderKL, folder / "vae", "diffusion_pytorch_model", rename=_rename_old_attention)
    scheduler_config = _read_json(folder / "scheduler" / "scheduler_config.json")
    scheduler = DDIMScheduler.from_config(scheduler_config)
    return unet.float().eval(), vae, projection.float().eval(), scheduler


def convert_released_decoder(
    folder: PathLike, out: PathLike, clip_models: Sequence[str], null_embedding: Optional[torch.Tensor] = None
) -> Path:
    """Write the released SD folder as the project's decoder folder (:func:`shifted.checkpoint.save_decoder`): a
    plain ``StableDiffusionPipeline`` (stock UNet, VAE, DDIM scheduler with the release's schedule, no text tower:
    the decoder reads image embeddings only) + ``image_projection/`` (``emb_proj_layers``; its null embedding
    ``null_embedding``, e.g. the released ``small_sft_empty_embeds.th`` the model was fine-tuned with)."""
    from shifted.checkpoint import save_decoder

    unet, vae, projection, scheduler = read_released_decoder(folder)
    if null_embedding is not None:
        projection.set_null_embedding(null_embedding)
    parts = dict(unet=unet, vae=vae, scheduler=scheduler, text_encoder=None, tokenizer=None)
    return save_decoder(out, parts, projection, clip_models)
