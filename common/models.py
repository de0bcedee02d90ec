"""Load pretrained components from local paths only: VAE, UNet, CLIP / T5 text encoders, open_clip models.

No hub, no downloads (``local_files_only=True`` everywhere), safetensors wherever the folder has them, and
``weights_only`` loads otherwise. Loaders write nothing. Before handing a folder to diffusers / transformers
each loader checks what a user most often gets wrong and turns it into a one-line :class:`UserError`:

- the path does not exist, or is a pipeline folder without the component's subfolder;
- the folder holds another kind of model (a VAE given as the UNet): expected vs found ``_class_name``;
- a weights file is truncated or corrupt, or is a pickle that would run code.

A pipeline root (a folder with ``model_index.json``) can be passed without ``subfolder``: each loader then
uses the Stable Diffusion name of its component (``vae``, ``unet``, ``text_encoder``, ``tokenizer``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from common.errors import UserError, one_line
from common.io import PathLike, is_torchscript_archive, load_torchscript_weights, safe_torch_load


VAE_CLASSES = ("AutoencoderKL",)
UNET_CLASSES = ("UNet2DConditionModel", "UNet2DModel")
CLIP_TEXT_MODEL_TYPES = ("clip_text_model", "clip")
T5_MODEL_TYPES = ("t5",)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model")


# --------------------------------------------------------------------------------------------------------------
# Folder checks shared by every save_pretrained-style loader
# --------------------------------------------------------------------------------------------------------------


def resolve_model_folder(path: PathLike, subfolder: str | None = None, default_subfolder: str | None = None) -> Path:
    """The folder holding one model's ``config.json``: ``path/subfolder``, or ``path/default_subfolder`` for a
    pipeline root passed without ``subfolder``, or ``path`` itself."""
    root = Path(path)
    if not root.exists():
        raise UserError(
            f"model path {root} does not exist: pass the folder written by save_pretrained (a pipeline folder, "
            "or the component folder inside it)"
        )
    if root.is_file():
        raise UserError(f"model path {root} is a file: pass the folder written by save_pretrained that contains it")
    if subfolder:
        folder = root / subfolder
        if not folder.is_dir():
            raise UserError(
                f"{root} has no subfolder {subfolder!r}: pass the pipeline folder that contains {subfolder}/, "
                "or the model folder itself without subfolder"
            )
        return folder
    if not (root / "config.json").is_file() and (root / "model_index.json").is_file() and default_subfolder:
        if (root / default_subfolder).is_dir():
            return root / default_subfolder
        raise UserError(f"pipeline folder {root} has no {default_subfolder}/ subfolder: pass subfolder=... explicitly")
    return root


def read_model_config(folder: Path) -> dict[str, Any]:
    """``folder/config.json`` as a dict; missing or unparsable is a :class:`UserError`."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(
            f"{folder} has no config.json: pass the folder written by save_pretrained (for a pipeline, the "
            "folder with model_index.json plus subfolder=...)"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{config_path} is not valid JSON ({one_line(str(err))}): re-save the model") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_path} is not a model config (a JSON object): re-save the model")
    return config


def describe_config(config: dict[str, Any]) -> str:
    """What a config says it is: diffusers ``_class_name``, else transformers ``architectures`` / ``model_type``."""
    if config.get("_class_name"):
        return str(config["_class_name"])
    if config.get("architectures"):
        return str(config["architectures"][0])
    if config.get("model_type"):
        return f"model_type {config['model_type']!r}"
    return "no recognisable model class"


def check_weight_files(folder: Path) -> bool:
    """Check the folder has weights and that every safetensors header is intact; True if safetensors exist.

    ``safe_open`` reads the header and checks that it covers the file exactly, which catches truncation and
    garbage without reading the tensors.
    """
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise UserError(
            f"{folder} has a config.json but no weights file (*.safetensors / *.bin): the save was interrupted, "
            "re-save the model"
        )
    safetensors_files = [p for p in files if p.suffix == ".safetensors"]
    for weights in safetensors_files:
        try:
            with safe_open(str(weights), framework="pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise UserError(
                f"{weights} is not a readable safetensors file ({one_line(str(err))}): it is truncated or corrupt, "
                "re-save or re-download it"
            ) from None
    return bool(safetensors_files)


@contextlib.contextmanager
def _loading(what: str, folder: Path) -> Iterator[None]:
    """Turn a library's failure on a checked folder (bad keys, shapes, pickles) into a one-line UserError."""
    try:
        yield
    except UserError:
        raise
    except (pickle.UnpicklingError, OSError, ValueError, RuntimeError, KeyError, SafetensorError) as err:
        if _caused_by_unpickling(err):
            raise UserError(
                f"a weights file in {folder} holds pickled Python objects, not plain weights: refusing to load it "
                "(convert it to safetensors where it was made)"
            ) from None
        raise UserError(f"could not load {what} from {folder}: {one_line(str(err))[:400]}") from None


def _caused_by_unpickling(err: BaseException | None) -> bool:
    """diffusers re-raises torch's weights-only ``UnpicklingError`` as ``OSError``; look down the chain."""
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, pickle.UnpicklingError):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def _checked_folder(
    path: PathLike, subfolder: str | None, default_subfolder: str, expected: tuple[str, ...], kind: str
) -> tuple[Path, dict[str, Any], bool]:
    """Resolve, read config, check the diffusers ``_class_name`` against ``expected``, check weight files."""
    folder = resolve_model_folder(path, subfolder, default_subfolder)
    config = read_model_config(folder)
    found = config.get("_class_name")
    if found not in expected:
        raise UserError(
            f"{folder} holds {describe_config(config)}, not a {kind} (expected _class_name "
            f"{' or '.join(expected)}): pass the {kind} folder, e.g. <pipeline>/{default_subfolder}"
        )
    return folder, config, check_weight_files(folder)


# --------------------------------------------------------------------------------------------------------------
# diffusers components
# --------------------------------------------------------------------------------------------------------------


def load_vae(path: PathLike, subfolder: str | None = None, variant: str | None = None):
    """``AutoencoderKL`` from a save_pretrained folder (or a pipeline folder: ``subfolder`` defaults to ``vae``)."""
    from diffusers import AutoencoderKL

    folder, _, has_safetensors = _checked_folder(path, subfolder, "vae", VAE_CLASSES, "VAE")
    with _loading("the VAE", folder):
        return AutoencoderKL.from_pretrained(
            folder, local_files_only=True, use_safetensors=has_safetensors or None, variant=variant
        )


def load_unet(path: PathLike, subfolder: str | None = None, variant: str | None = None):
    """``UNet2DConditionModel`` or ``UNet2DModel``, whichever the folder's ``_class_name`` names.

    ``subfolder`` defaults to ``unet`` for a pipeline folder.
    """
    from diffusers import UNet2DConditionModel, UNet2DModel

    folder, config, has_safetensors = _checked_folder(path, subfolder, "unet", UNET_CLASSES, "UNet")
    model_class = UNet2DConditionModel if config["_class_name"] == "UNet2DConditionModel" else UNet2DModel
    with _loading(f"the {model_class.__name__}", folder):
        return model_class.from_pretrained(
            folder, local_files_only=True, use_safetensors=has_safetensors or None, variant=variant
        )


# --------------------------------------------------------------------------------------------------------------
# transformers text encoders
# --------------------------------------------------------------------------------------------------------------


def _checked_transformers_folder(
    path: PathLike, subfolder: str | None, default_subfolder: str, model_types: tuple[str, ...], kind: str
) -> tuple[Path, dict[str, Any], bool]:
    folder = resolve_model_folder(path, subfolder, default_subfolder)
    config = read_model_config(folder)
    if config.get("model_type") not in model_types:
        raise UserError(
            f"{folder} holds {describe_config(config)}, not a {kind} (expected model_type "
            f"{' or '.join(model_types)}): pass the {kind} folder, e.g. <pipeline>/{default_subfolder}"
        )
    return folder, config, check_weight_files(folder)


def find_tokenizer_folder(model_folder: Path, tokenizer_path: PathLike | None = None) -> Path:
    """Where a text encoder's tokenizer lives: ``tokenizer_path``, the model folder itself (Hub layout), or the
    sibling a pipeline uses (``text_encoder`` -> ``tokenizer``, ``text_encoder_2`` -> ``tokenizer_2``)."""
    if tokenizer_path is not None:
        folder = Path(tokenizer_path)
        if not folder.is_dir():
            raise UserError(f"tokenizer path {folder} does not exist: pass the folder written by save_pretrained")
        return folder
    if any((model_folder / name).is_file() for name in TOKENIZER_FILES):
        return model_folder
    if model_folder.name.startswith("text_encoder"):
        sibling = model_folder.parent / model_folder.name.replace("text_encoder", "tokenizer", 1)
        if sibling.is_dir():
            return sibling
    raise UserError(f"found no tokenizer in or next to {model_folder}: pass tokenizer_path=<tokenizer folder>")


def _check_tokenizer_class(folder: Path, expected: tuple[str, ...]) -> None:
    """If ``tokenizer_config.json`` names a class, it must be one of ``expected`` (e.g. no T5 vocab for CLIP)."""
    config_path = folder / "tokenizer_config.json"
    if not config_path.is_file():
        return
    try:
        declared = json.loads(config_path.read_text(encoding="utf-8")).get("tokenizer_class")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        raise UserError(f"{config_path} is not valid JSON ({one_line(str(err))}): re-save the tokenizer") from None
    if declared and declared not in expected:
        raise UserError(
            f"{folder} holds a {declared}, expected {' or '.join(expected)}: pass the matching tokenizer_path"
        )


def _check_tokenizer_fits(tokenizer, model, tokenizer_folder: Path, model_folder: Path) -> None:
    """A tokenizer that can emit ids past the embedding table belongs to another model."""
    if len(tokenizer) > model.config.vocab_size:
        raise UserError(
            f"tokenizer {tokenizer_folder} has {len(tokenizer)} tokens but the encoder in {model_folder} embeds only "
            f"{model.config.vocab_size}: they do not belong together, pass the matching tokenizer_path"
        )


def load_clip_text(
    path: PathLike,
    subfolder: str | None = None,
    tokenizer_path: PathLike | None = None,
    with_projection: bool | None = None,
    variant: str | None = None,
):
    """``(text_encoder, tokenizer)``: a transformers ``CLIPTextModel`` (or ``...WithProjection``) and ``CLIPTokenizer``.

    ``path`` may be the text encoder folder, a pipeline folder (``subfolder`` defaults to ``text_encoder``) or a
    full CLIP model folder (``model_type`` ``clip``; its text tower is loaded). ``with_projection=None`` follows
    the folder's ``architectures``. The tokenizer is found as in :func:`find_tokenizer_folder`.
    """
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder, config, has_safetensors = _checked_transformers_folder(
        path, subfolder, "text_encoder", CLIP_TEXT_MODEL_TYPES, "CLIP text encoder"
    )
    if with_projection is None:
        with_projection = "CLIPTextModelWithProjection" in config.get("architectures", [])
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    with _loading(f"the {model_class.__name__}", folder):
        model = model_class.from_pretrained(
            folder, local_files_only=True, use_safetensors=has_safetensors or None, variant=variant
        ).eval()
    tokenizer_folder = find_tokenizer_folder(folder, tokenizer_path)
    _check_tokenizer_class(tokenizer_folder, ("CLIPTokenizer", "CLIPTokenizerFast"))
    with _loading("the CLIP tokenizer", tokenizer_folder):
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_folder, local_files_only=True)
    _check_tokenizer_fits(tokenizer, model, tokenizer_folder, folder)
    return model, tokenizer


def load_t5_encoder(
    path: PathLike,
    subfolder: str | None = None,
    tokenizer_path: PathLike | None = None,
    variant: str | None = None,
):
    """``(encoder, tokenizer)``: a transformers ``T5EncoderModel`` and the tokenizer its folder declares.

    ``path`` may be an encoder-only or a full T5 folder (the decoder weights are then skipped), or a pipeline
    folder (``subfolder`` defaults to ``text_encoder``). The tokenizer is loaded with ``AutoTokenizer`` so a
    folder's own class (``T5Tokenizer``, ...) is respected.
    """
    from transformers import AutoTokenizer, T5EncoderModel

    folder, _, has_safetensors = _checked_transformers_folder(
        path, subfolder, "text_encoder", T5_MODEL_TYPES, "T5 encoder"
    )
    with _loading("the T5EncoderModel", folder):
        model = T5EncoderModel.from_pretrained(
            folder, local_files_only=True, use_safetensors=has_safetensors or None, variant=variant
        ).eval()
    tokenizer_folder = find_tokenizer_folder(folder, tokenizer_path)
    with _loading("the T5 tokenizer", tokenizer_folder):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder, local_files_only=True)
    _check_tokenizer_fits(tokenizer, model, tokenizer_folder, folder)
    return model, tokenizer


# --------------------------------------------------------------------------------------------------------------
# open_clip
# --------------------------------------------------------------------------------------------------------------

# Non-tensor attributes OpenAI's JIT archives carry; open_clip's own loader drops them too.
_OPENAI_JIT_EXTRAS = ("input_resolution", "context_length", "vocab_size")
_OPEN_CLIP_LOCAL_WEIGHTS = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "model.safetensors",
    "open_clip_pytorch_model.bin",
    "pytorch_model.bin",
)


def register_open_clip_config(config_path: PathLike) -> str:
    """Register an open_clip model config JSON with ``open_clip.add_model_config`` and return its name (the stem).

    open_clip keys its registry by file stem and a later file silently replaces an earlier one, so a file whose
    stem is already registered with *different* contents is refused instead of shadowing, e.g., ``ViT-B-32``.
    """
    import open_clip

    config_path = Path(config_path)
    if not config_path.is_file():
        raise UserError(f"open_clip model config {config_path} does not exist: pass an existing .json file")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{config_path} is not valid JSON ({one_line(str(err))})") from None
    if isinstance(config, dict) and "model_cfg" in config:
        raise UserError(
            f"{config_path} is an open_clip folder config (it wraps model_cfg): pass the folder that holds it"
        )
    if not (isinstance(config, dict) and all(key in config for key in ("embed_dim", "vision_cfg", "text_cfg"))):
        raise UserError(f"{config_path} is not an open_clip model config: it needs embed_dim, vision_cfg and text_cfg")
    name = config_path.stem
    existing = open_clip.get_model_config(name)
    if existing is None:
        open_clip.add_model_config(config_path)
    elif existing != config:
        raise UserError(
            f"open_clip already has a different model config named {name!r}: rename {config_path} to a new name"
        )
    return name


def create_open_clip(model_config: PathLike):
    """A randomly initialised open_clip CLIP from a model config ``.json`` -> ``(model, name, preprocess_cfg)``."""
    import open_clip

    name = register_open_clip_config(model_config)
    model = open_clip.create_model(name, pretrained=None, load_weights=False)
    preprocess_cfg = dict(model.visual.preprocess_cfg) if hasattr(model.visual, "preprocess_cfg") else {}
    return model, name, preprocess_cfg


def save_open_clip_folder(model, model_cfg: dict, preprocess_cfg: dict, folder: PathLike, dtype: torch.dtype) -> None:
    """Write ``model`` in open_clip's local folder layout (``open_clip_config.json`` + ``open_clip_model.safetensors``,
    read by :func:`load_open_clip`) plus its text tower as a transformers ``CLIPTextModelWithProjection`` in
    ``text_encoder/`` and the CLIP tokenizer in ``tokenizer/``, atomically, in ``dtype``."""
    from common.clip_convert import open_clip_text_to_transformers
    from common.io import save_pretrained_into, save_safetensors
    from common.tiny import clip_tokenizer

    def write(tmp: Path) -> None:
        state = {k: v.detach().to(dtype) for k, v in model.state_dict().items() if v.is_floating_point()}
        save_safetensors(state, tmp / "open_clip_model.safetensors")
        (tmp / "open_clip_config.json").write_text(
            json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2))
        text = open_clip_text_to_transformers(model).to(dtype)
        text.save_pretrained(tmp / "text_encoder", safe_serialization=True)
        clip_tokenizer().save_pretrained(tmp / "tokenizer")

    # Into the folder itself, beside the trainer's checkpoints and logs (train_clip writes output_dir directly).
    save_pretrained_into(folder, write)


def _resolve_open_clip_model(model_name: PathLike, weights_path: PathLike | None) -> tuple[str, Path]:
    """open_clip's model identifier and the weights file: a registered name, a config ``.json``, or a folder
    with ``open_clip_config.json`` (open_clip's ``local-dir:`` layout, whose weights file may be implied)."""
    import open_clip

    name = str(model_name)
    if name.startswith(("hf-hub:", "local-dir:")):
        raise UserError(f"pass a model name, config .json or local folder, not {name!r}: nothing is downloaded here")
    local = Path(name)
    if local.is_dir():
        if not (local / "open_clip_config.json").is_file():
            raise UserError(f"{local} has no open_clip_config.json: pass a model name or a model config .json")
        identifier = f"local-dir:{local}"
        if weights_path is None:
            found = [local / f for f in _OPEN_CLIP_LOCAL_WEIGHTS if (local / f).is_file()]
            if not found:
                raise UserError(f"{local} holds no open_clip weights file: pass weights_path=...")
            weights_path = found[0]
    elif name.endswith(".json"):
        identifier = register_open_clip_config(local)
    elif open_clip.get_model_config(name) is not None:
        identifier = name
    else:
        raise UserError(
            f"unknown open_clip model {name!r}: pass a name from open_clip.list_models() (e.g. ViT-B-32) or the "
            "path of a model config .json"
        )
    if weights_path is None:
        raise UserError(f"no weights given for open_clip model {name!r}: pass weights_path=<.safetensors/.pt/.bin>")
    weights = Path(weights_path)
    if not weights.exists():
        raise UserError(
            f"model path {weights} does not exist: pass the local open_clip weights file (.safetensors, a state-dict "
            ".pt/.bin, or an OpenAI JIT .pt)"
        )
    return identifier, weights


def read_open_clip_weights(weights: Path) -> dict[str, torch.Tensor]:
    """A flat state dict from safetensors, a ``weights_only`` torch checkpoint, or an OpenAI TorchScript archive.

    Unwraps ``{"state_dict": ...}`` and DataParallel ``module.`` prefixes, as ``open_clip.load_state_dict`` does.
    """
    from common.io import load_safetensors, require_file

    weights = require_file(weights, "weights file")
    if weights.suffix == ".safetensors":
        state_dict: Any = load_safetensors(weights)
    elif is_torchscript_archive(weights):
        state_dict = load_torchscript_weights(weights)
    else:
        state_dict = safe_torch_load(weights)
    if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    if not (isinstance(state_dict, dict) and state_dict and all(isinstance(v, torch.Tensor) for v in state_dict.values())):
        raise UserError(f"{weights} does not hold a state dict of tensors: pass open_clip model weights")
    if all(key.startswith("module.") for key in state_dict):
        state_dict = {key[len("module.") :]: value for key, value in state_dict.items()}
    return dict(state_dict)


def load_open_clip_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Fit a state dict to an open_clip model with open_clip's own conversions, then load it strictly.

    Same steps as ``open_clip.factory.load_checkpoint`` (third-party key conversion, OpenAI -> custom-text
    layout, ``logit_scale`` shape, position-embedding resizing), plus dropping tensors the model keeps as
    non-persistent buffers (a TorchScript archive stores those, e.g. the causal ``attn_mask``). Missing or
    unexpected keys and shape mismatches become a UserError naming a few of them.
    """
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

    state_dict = dict(state_dict)
    for key in _OPENAI_JIT_EXTRAS:
        state_dict.pop(key, None)
    state_dict = convert_state_dict(model, state_dict)
    if "positional_embedding" in state_dict and not hasattr(model, "positional_embedding"):
        state_dict = convert_to_custom_text_state_dict(state_dict)
    for key in ("logit_scale", "logit_bias"):
        target = getattr(model, key, None)
        if key in state_dict and target is not None and target.ndim != state_dict[key].ndim:
            state_dict[key] = state_dict[key].reshape(target.shape)
    if "logit_bias" not in state_dict and getattr(model, "logit_bias", None) is not None and "logit_scale" in state_dict:
        state_dict["logit_bias"] = torch.zeros_like(state_dict["logit_scale"])
    persistent = set(model.state_dict())
    for name, _ in model.named_buffers():
        if name not in persistent:
            state_dict.pop(name, None)
    resize_pos_embed(state_dict, model)
    resize_text_pos_embed(state_dict, model)
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as err:
        raise UserError(f"{source} does not fit this open_clip model: {one_line(str(err))[:300]}") from None
    if result.missing_keys or result.unexpected_keys:
        raise UserError(
            f"{source} does not fit this open_clip model (missing {result.missing_keys[:3]}, unexpected "
            f"{result.unexpected_keys[:3]}): pass the model name or config the weights were trained with"
        )


class _DropRandomInitWarning(logging.Filter):
    """open_clip warns 'initialized randomly' when it builds a model without weights; we load them right after."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def load_open_clip(model_name: PathLike, weights_path: PathLike | None = None, device: str | torch.device = "cpu"):
    """``(model, preprocess, tokenizer)`` for an open_clip CLIP from a local weights file, in eval mode.

    ``model_name``: a registered open_clip name (``ViT-B-32``), the path of a model config ``.json`` (registered
    with :func:`register_open_clip_config`), or a folder in open_clip's ``local-dir`` layout
    (``open_clip_config.json`` + weights; ``weights_path`` may then be omitted).
    ``weights_path``: ``.safetensors``; a state-dict ``.pt`` / ``.bin`` (read with ``weights_only=True``); or an
    OpenAI TorchScript ``.pt`` (the original CLIP release), whose weights are read without running its code
    (:func:`common.io.load_torchscript_weights`) and which implies QuickGELU, as open_clip's ``openai`` tag does.
    ``preprocess`` is open_clip's eval transform (PIL -> ``[3, S, S]`` normalised); ``tokenizer(texts)`` gives
    ``[N, context_length]`` ids padded with 0.
    """
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    identifier, weights = _resolve_open_clip_model(model_name, weights_path)
    is_openai_jit = weights.suffix != ".safetensors" and is_torchscript_archive(weights)
    state_dict = read_open_clip_weights(weights)
    quiet = _DropRandomInitWarning()
    logging.getLogger().addFilter(quiet)
    try:
        with _loading(f"open_clip model {model_name}", Path(str(model_name))):
            model = open_clip.create_model(
                identifier,
                pretrained=None,
                load_weights=False,
                pretrained_image=False,
                pretrained_text=False,
                force_quick_gelu=is_openai_jit,
            )
            tokenizer = open_clip.get_tokenizer(identifier)
    finally:
        logging.getLogger().removeFilter(quiet)
    load_open_clip_state_dict(model, state_dict, str(weights))
    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    return model.to(device).eval(), preprocess, tokenizer
