"""Versatile Diffusion settings: one flat mapping of ``key: value``, where every key is a future script flag.

``configs/versatile/{tiny,paper}.yaml`` are flat (the shared trainer's ``--config`` files are flat mappings of
flag names, a flag on the command line wins). Each key below is a field of exactly one section dataclass, so a
YAML file is split into sections by field name; an unknown key is a :class:`UserError`, never dropped silently.

Full-size defaults are the released four-flow model (``vd_four_flow_v1-0`` of [R]).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from common.errors import UserError


REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs" / "versatile"


@dataclass(frozen=True)
class DiffuserConfig:
    """Sizes of the multi-flow diffuser (METHOD.md, "Routing" and "Parameter counts").

    The image data layers are SD-v1's UNet without its transformers; the text data layers are the same skeleton
    built from fully-connected ResBlocks on a ``[B, C, second_dim, 1]`` hidden state; one context set (16
    transformer blocks at full size) per context type; the timestep MLP is the only global module.
    """

    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[bool, ...] = (True, True, True, False)  # [R] attention_resolutions [4, 2, 1]
    num_heads: int = 8
    context_dim: int = 768  # CLIP ViT-L/14 projection width (text and image contexts share it)
    second_dim: int = 4  # pseudo-tokens of the text hidden state [B, C, 4, 1]
    text_latent_dim: int = 768  # Optimus latent
    image_latent_channels: int = 4  # kl-f8 latent
    norm_num_groups: int = 32
    zero_init: bool = True  # [R] zero_module(): ResBlock out convs, heads, transformer proj_out

    def validate(self) -> DiffuserConfig:
        c, g = self.model_channels, self.norm_num_groups
        _check(c > 0 and g > 0 and self.num_heads > 0, "model_channels, norm_num_groups and num_heads must be > 0")
        _check(len(self.channel_mult) >= 1, "channel_mult needs at least one level")
        _check(
            len(self.attention_levels) == len(self.channel_mult),
            f"attention_levels has {len(self.attention_levels)} entries but channel_mult has "
            f"{len(self.channel_mult)}: give one true/false per level",
        )
        _check(self.num_res_blocks >= 1, "num_res_blocks must be >= 1")
        for mult in self.channel_mult:
            width = c * mult
            _check(width % g == 0, f"width {width} is not divisible by norm_num_groups {g}")
            _check(width % self.num_heads == 0, f"width {width} is not divisible by num_heads {self.num_heads}")
        _check(self.second_dim >= 1, "second_dim must be >= 1")
        _check(self.context_dim > 0 and self.text_latent_dim > 0, "context_dim and text_latent_dim must be > 0")
        return self


@dataclass(frozen=True)
class TextVAEConfig:
    """The Optimus-like text VAE (METHOD.md, "Optimus"): BERT encoder -> latent mean, GPT-2 decoder with latent injection.

    Vocabulary sizes of ``None`` are taken from the tokenizers; the paper values (BERT-base-cased 28,996 and GPT-2
    50,257 + 3 special tokens) are only needed to size a model without its tokenizers (parameter counts).
    """

    optimus_hidden_size: int = 768
    optimus_encoder_layers: int = 12
    optimus_decoder_layers: int = 12
    optimus_heads: int = 12
    optimus_intermediate_size: int = 3072
    optimus_encoder_positions: int = 512
    optimus_decoder_positions: int = 1024
    optimus_encoder_vocab_size: Optional[int] = None
    optimus_decoder_vocab_size: Optional[int] = None
    optimus_max_length: int = 77  # [R] truncates the BERT input to 77 wordpieces
    optimus_lowercase: bool = True  # [R] lower-cases before the (cased) BERT tokenizer
    optimus_tokenizer: str = "words"  # "words" (built offline from optimus_words), "clip", or a local folder
    optimus_words: tuple[str, ...] = ()
    # Diffusion latent = scaling_factor * mu (VD: 1.0, no scale; a small VAE trained here stores 1 / std(mu), as
    # SD's image VAE stores 0.18215, so the diffuser sees roughly unit-variance latents).
    optimus_scaling_factor: float = 1.0

    def validate(self) -> TextVAEConfig:
        _check(self.optimus_hidden_size % self.optimus_heads == 0, "optimus_hidden_size must divide by optimus_heads")
        _check(self.optimus_max_length >= 3, "optimus_max_length must leave room for [CLS], a word and [SEP]")
        _check(self.optimus_scaling_factor > 0, "optimus_scaling_factor must be > 0")
        return self


@dataclass(frozen=True)
class ContextConfig:
    """CLIP context encoders (METHOD.md, "Contexts") and the unconditional contexts for CFG (paper §3.4, Fig. 6)."""

    clip_text_max_length: int = 77
    clip_image_size: int = 224
    image_pre_resize: Optional[int] = 512  # [R] app.py resizes to 512x512 (bicubic) before CLIP's own resize/crop
    uncond_image: Optional[str] = None  # zeros | grey | black; None = per-flow default (zeros iv/dual, black i2t)
    # Constant factor on every normalised context token (VD: 1.0). sqrt(context_dim) gives the tokens the per-dimension
    # scale of LayerNorm outputs (what SD's cross-attention sees), which a small model trained from scratch needs.
    context_scale: float = 1.0

    def validate(self) -> ContextConfig:
        from versatile.context import NULL_IMAGE_KINDS

        _check(
            self.uncond_image is None or self.uncond_image in NULL_IMAGE_KINDS,
            f"uncond_image {self.uncond_image!r}: choose one of {', '.join(NULL_IMAGE_KINDS)}",
        )
        _check(self.context_scale > 0, f"context_scale {self.context_scale} must be > 0")
        return self


@dataclass(frozen=True)
class SamplingConfig:
    """Sampler and guidance defaults (METHOD.md, "DDIM"): DDIM 50 steps, eta 0, CFG 7.5, SD's scaled-linear schedule."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    steps: int = 50
    scale: float = 7.5
    eta: float = 0.0
    text_ratio: float = 0.5  # dual guidance: weight of the text context (diffusers' text_to_image_strength)
    text_temperature: float = 1.0
    text_max_len: int = 30
    image_scaling_factor: float = 0.18215
    resolution: Optional[int] = None  # output side in pixels; None = the image VAE's sample_size

    def validate(self) -> SamplingConfig:
        _check(0.0 <= self.text_ratio <= 1.0, f"text_ratio {self.text_ratio} must lie in [0, 1]")
        _check(self.steps >= 1, "steps must be >= 1")
        return self


@dataclass(frozen=True)
class TrainingConfig:
    """Multi-flow training (paper §3.5): the flows, how each step picks them, per-group LR multipliers, cond drop."""

    flows: tuple[str, ...] = ("t2i", "iv", "i2t", "tv")
    flow_sampling: str = "all"  # "all": every flow each step (Algorithm 1); "one": one flow drawn per step
    flow_weights: Optional[tuple[float, ...]] = None
    group_lr_scale: tuple[tuple[str, float], ...] = (
        ("data_image", 0.2), ("data_text", 1.0), ("ctx_image", 1.0), ("ctx_text", 1.0), ("global", 0.1),
    )
    cond_drop: float = 0.1

    def validate(self) -> TrainingConfig:
        from versatile.multiflow import resolve_flow
        from versatile.training import FLOW_SAMPLING, check_multipliers

        for name in self.flows:
            resolve_flow(name)
        _check(self.flow_sampling in FLOW_SAMPLING, f"flow_sampling {self.flow_sampling!r}: choose all or one")
        if self.flow_weights is not None:
            _check(len(self.flow_weights) == len(self.flows), "flow_weights needs one weight per flow")
        check_multipliers(dict(self.group_lr_scale))
        _check(0.0 <= self.cond_drop < 1.0, f"cond_drop {self.cond_drop} must lie in [0, 1)")
        return self


SECTIONS = {
    "diffuser": DiffuserConfig,
    "text_vae": TextVAEConfig,
    "context": ContextConfig,
    "sampling": SamplingConfig,
    "training": TrainingConfig,
}


@dataclass(frozen=True)
class VersatileConfig:
    """All sections; ``VersatileConfig.load("tiny")`` reads ``configs/versatile/tiny.yaml``."""

    diffuser: DiffuserConfig = field(default_factory=DiffuserConfig)
    text_vae: TextVAEConfig = field(default_factory=TextVAEConfig)
    context: ContextConfig = field(default_factory=ContextConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    extra: tuple[tuple[str, Any], ...] = ()  # keys owned by the shared trainer (learning_rate, ...), passed through

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], passthrough: tuple[str, ...] = (), source: str = "config"):
        """Split a flat mapping into sections; keys in ``passthrough`` (trainer flags) are kept in ``extra``."""
        owners = {f.name: section for section, klass in SECTIONS.items() for f in fields(klass)}
        parts: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
        extra = []
        for raw_key, value in data.items():
            key = str(raw_key).replace("-", "_")
            if key in owners:
                parts[owners[key]][key] = _coerce(SECTIONS[owners[key]], key, value, source)
            elif key in passthrough:
                extra.append((key, value))
            else:
                raise UserError(f"{source}: unknown key {key!r}; known keys are the fields of versatile.config")
        built = {section: SECTIONS[section](**values).validate() for section, values in parts.items()}
        return cls(**built, extra=tuple(extra))

    @classmethod
    def load(cls, name_or_path: str | Path, passthrough: Optional[tuple[str, ...]] = None) -> VersatileConfig:
        """Read a flat YAML file (a path, or a name under ``configs/versatile/``).

        ``passthrough``: keys kept aside for the shared trainer; default: the flags of ``common.train.TrainConfig``.
        """
        import yaml

        if passthrough is None:
            passthrough = trainer_keys()
        path = Path(name_or_path)
        if not path.suffix:
            path = CONFIG_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise UserError(f"config {path} does not exist: pass a YAML file or one of tiny, paper")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise UserError(f"config {path}: not valid YAML ({' '.join(str(err).split())})") from None
        if not isinstance(data, dict):
            raise UserError(f"config {path}: expected a flat mapping of key: value")
        return cls.from_mapping(data, passthrough, source=str(path))

    def to_mapping(self) -> dict[str, Any]:
        """The flat mapping again (tuples as lists), e.g. to write next to a checkpoint."""
        out: dict[str, Any] = {}
        for section in SECTIONS:
            for key, value in dataclasses.asdict(getattr(self, section)).items():
                out[key] = dict(value) if key == "group_lr_scale" else _plain(value)
        out.update(dict(self.extra))
        return out


def trainer_keys() -> tuple[str, ...]:
    """Flag names of the shared trainer (``common.train.TrainConfig``) that a versatile YAML may also carry."""
    try:
        from common.train import TrainConfig
    except ImportError:  # the trainer is optional for building models
        return ()
    return tuple(f.name for f in fields(TrainConfig))


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _coerce(klass: type, key: str, value: Any, source: str) -> Any:
    """YAML lists -> tuples; ``group_lr_scale`` may be a mapping or ``"a=0.2,b=1"``; bools stay bools."""
    default = {f.name: f for f in fields(klass)}[key].default
    if key == "group_lr_scale":
        if isinstance(value, str):
            try:
                pairs = [item.split("=") for item in value.split(",") if item.strip()]
                value = {k.strip(): float(v) for k, v in pairs}
            except ValueError:
                raise UserError(f"{source}: group_lr_scale {value!r}: write name=multiplier,name=multiplier") from None
        if not isinstance(value, Mapping):
            raise UserError(f"{source}: group_lr_scale must be a mapping of group name to LR multiplier")
        return tuple((str(k), float(v)) for k, v in value.items())
    if isinstance(value, str) and isinstance(default, tuple):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, list):
        return tuple(value)
    if isinstance(default, bool) and not isinstance(value, bool):
        raise UserError(f"{source}: {key} must be true or false, got {value!r}")
    return value


def describe(config: VersatileConfig) -> str:
    """Parameter counts of the diffuser (per group and per flow) and the text VAE, built on the meta device."""
    from versatile.multiflow import FLOWS, build_diffuser, count_parameters, flow_parameter_count
    from versatile.text_vae import build_text_vae

    model = build_diffuser(config.diffuser, device="meta")
    lines = [f"{name:>12}: {count:>15,}" for name, count in count_parameters(model).items()]
    lines += [f"{'flow ' + name:>12}: {flow_parameter_count(model, name):>15,}" for name in FLOWS]
    tv = config.text_vae
    if tv.optimus_encoder_vocab_size and tv.optimus_decoder_vocab_size:
        vae = build_text_vae(tv, config.diffuser.text_latent_dim, tokenizers=(None, None), device="meta")
        lines.append(f"{'text VAE':>12}: {sum(p.numel() for p in vae.parameters()):>15,}")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    from common.errors import cli_entry

    @cli_entry
    def main() -> None:
        parser = argparse.ArgumentParser(description="Print the parameter counts of a Versatile Diffusion config.")
        parser.add_argument("config", nargs="?", default="paper", help="tiny, paper, or a YAML path")
        print(describe(VersatileConfig.load(parser.parse_args().config)))

    main()
