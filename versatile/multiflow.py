"""The multi-flow diffuser of Versatile Diffusion (Xu et al., ICCV 2023, §3.2-3.3, Fig. 3).

One network serves every *flow* (data type generated, context type conditioned on). Its layers fall in three
groups (paper Fig. 3):

- **global layers**, shared by all flows: only the timestep embedding (sinusoid -> MLP);
- **data layers**, one set per data type: image = SD-v1's ResBlocks, down/up-samplers, stem and head on
  ``[B, 4, h, w]`` latents; text = fully-connected ResBlocks on the Optimus latent held as ``[B, C, 4, 1]``;
- **context layers**, one set per context type (text, image): SD-v1 transformer blocks (self-attention,
  cross-attention to the context tokens, feed-forward) that work on either data type's hidden state.

Both data sets and both context sets are laid out along ONE layer sequence (:func:`layer_plan`), so any data set
walks with any context set: choosing a flow picks ``data[xtype]`` and ``context[ctype]`` and calls nothing else.
Dual / multi-context guidance (paper §3.3, "attention-level mixing") replaces each context slot by the
ratio-weighted mixture ``h + sum_i r_i (T_i(h, c_i) - h)`` (:meth:`MultiFlowDiffuser.forward`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from common.errors import UserError
from versatile.config import DiffuserConfig
from versatile.layers import RESNET_EPS, FlatResBlock, ImageHead, LinearMultiDim, TextHead


DATA_TYPES = ("image", "text")
CONTEXT_TYPES = ("text", "image")
GROUPS = ("global", "data_image", "data_text", "ctx_image", "ctx_text")


# --------------------------------------------------------------------------------------------------------------
# flows
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Flow:
    """A flow = the data type it generates and the context type(s) it is conditioned on (paper §3.2)."""

    name: str
    xtype: str
    ctypes: tuple[str, ...]
    description: str

    @property
    def groups(self) -> tuple[str, ...]:
        """The parameter groups this flow runs through (and the only ones that get gradients)."""
        return ("global", f"data_{self.xtype}", *(f"ctx_{c}" for c in self.ctypes))


FLOWS: dict[str, Flow] = {
    "t2i": Flow("t2i", "image", ("text",), "text-to-image"),
    "iv": Flow("iv", "image", ("image",), "image variation"),
    "i2t": Flow("i2t", "text", ("image",), "image-to-text"),
    "tv": Flow("tv", "text", ("text",), "text variation"),
    "dual": Flow("dual", "image", ("text", "image"), "dual-guided (text + image contexts)"),
}
# [R0] inference.py --app names and the image-to-image / text-to-text spellings.
FLOW_ALIASES = {
    "text-to-image": "t2i", "image-variation": "iv", "i2i": "iv", "image-to-text": "i2t",
    "text-variation": "tv", "t2t": "tv", "dual-guided": "dual",
}
# The names the command lines accept (short forms and their aliases).
FLOW_CHOICES = ("t2i", "i2i", "iv", "i2t", "t2t", "tv", "dual")


def resolve_flow(flow: Union[str, Flow]) -> Flow:
    """A :class:`Flow` from its name or an alias; an unknown name is a :class:`UserError`."""
    if isinstance(flow, Flow):
        return flow
    name = FLOW_ALIASES.get(str(flow), str(flow))
    if name not in FLOWS:
        raise UserError(f"unknown flow {flow!r}: choose one of {', '.join(FLOWS)} (aliases: {', '.join(FLOW_ALIASES)})")
    return FLOWS[name]


@dataclass(frozen=True, eq=False)  # holds a tensor: identity, not element-wise, equality
class Context:
    """One conditioning input of a context slot: its type, tokens ``[B, L, context_dim]`` and mixing weight."""

    kind: str
    tokens: torch.Tensor
    weight: float = 1.0


# --------------------------------------------------------------------------------------------------------------
# the shared layer sequence
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One entry of the layer sequence (METHOD.md, "Routing").

    ``op``: ``d`` next data module, ``c`` next context module, ``S`` push the hidden state as a skip, ``L`` pop a
    skip and concatenate it on the channel axis. ``role`` (stem, res, down, up, head, ctx), ``phase`` (in, mid,
    out), ``level`` and ``index`` (position of a ResBlock / transformer within its level) name the module in the
    released checkpoint layouts; ``cin`` / ``cout`` are widths in model channels (a skip's width for ``L``).
    """

    op: str
    role: str = ""
    phase: str = ""
    level: int = -1
    index: int = 0
    cin: int = 0
    cout: int = 0


def layer_plan(config: DiffuserConfig) -> tuple[Step, ...]:
    """The one layer sequence every data set and every context set is built from ([R] ``UNetModel2D_Next``).

    Input: stem, S, per level (res [ctx] S) x num_res_blocks, then down S except at the last level; middle: res ctx
    res; output: per level from the bottom (L res [ctx]) x (num_res_blocks + 1), then up except at level 0; head.
    At full size: 30 data modules, 16 context modules, 12 skips.
    """
    c0, mults, n = config.model_channels, config.channel_mult, config.num_res_blocks
    steps = [Step("d", "stem", "in", 0, 0, 0, c0), Step("S", phase="in", cin=c0)]
    skips, ch = [c0], c0
    for level, mult in enumerate(mults):
        for i in range(n):
            steps.append(Step("d", "res", "in", level, i, ch, c0 * mult))
            ch = c0 * mult
            if config.attention_levels[level]:
                steps.append(Step("c", "ctx", "in", level, i, ch, ch))
            steps.append(Step("S", phase="in", cin=ch))
            skips.append(ch)
        if level != len(mults) - 1:
            steps += [Step("d", "down", "in", level, 0, ch, ch), Step("S", phase="in", cin=ch)]
            skips.append(ch)
    steps += [
        Step("d", "res", "mid", len(mults) - 1, 0, ch, ch),
        Step("c", "ctx", "mid", len(mults) - 1, 0, ch, ch),
        Step("d", "res", "mid", len(mults) - 1, 1, ch, ch),
    ]
    for level in reversed(range(len(mults))):
        for i in range(n + 1):
            skip = skips.pop()
            steps.append(Step("L", phase="out", cin=skip))
            steps.append(Step("d", "res", "out", level, i, ch + skip, c0 * mults[level]))
            ch = c0 * mults[level]
            if config.attention_levels[level]:
                steps.append(Step("c", "ctx", "out", level, i, ch, ch))
        if level != 0:
            steps.append(Step("d", "up", "out", level, 0, ch, ch))
    steps.append(Step("d", "head", "out", 0, 0, ch, 0))
    return tuple(steps)


# --------------------------------------------------------------------------------------------------------------
# layer groups
# --------------------------------------------------------------------------------------------------------------


class GlobalLayers(nn.Module):
    """Timestep embedding, the only layers shared by every flow: ``t [B] -> emb [B, 4 * C0]``.

    Sinusoid of width C0 with cos first and max period 1e4 (``Timesteps(C0, flip_sin_to_cos=True, shift=0)``,
    parameter-free), then Linear(C0, 4 C0) -> SiLU -> Linear(4 C0, 4 C0): 2,050,560 parameters at C0 = 320.
    """

    def __init__(self, model_channels: int):
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps

        self.time_proj = Timesteps(model_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(model_channels, 4 * model_channels)

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.time_embedding(self.time_proj(t).to(dtype))


class DataLayers(nn.Module):
    """The data modules of one data type, in :func:`layer_plan` order (``layers[k]`` is the k-th ``d``)."""

    xtype = ""

    def __init__(self, plan: Sequence[Step], config: DiffuserConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(self.make(step) for step in plan if step.op == "d")
        # ResBlocks take the timestep embedding; stems, samplers and heads do not.
        self.takes_emb = tuple(isinstance(layer, self.timestep_blocks()) for layer in self.layers)
        if config.zero_init:
            self.zero_init_()

    # Each data type supplies these four (ImageDataLayers, TextDataLayers below).

    def make(self, step: Step) -> nn.Module:
        """The module for one ``d`` step of the plan (role stem / res / down / up / head)."""
        raise NotImplementedError(f"{type(self).__name__} must build its data modules")

    @staticmethod
    def timestep_blocks() -> tuple[type, ...]:
        """The module classes that take the timestep embedding as a second input."""
        raise NotImplementedError

    def zero_init_(self) -> None:
        """Zero the last layer of every residual branch and the head ([R] ``zero_module``)."""
        raise NotImplementedError

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a :class:`UserError` if ``x`` is not a latent of this data type."""
        raise NotImplementedError


class ImageDataLayers(DataLayers):
    """Image data layers: SD-v1's UNet minus its transformers, on latents ``[B, 4, h, w]``."""

    xtype = "image"

    def make(self, step: Step) -> nn.Module:
        from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D

        cfg, groups = self.config, self.config.norm_num_groups
        if step.role == "stem":
            return nn.Conv2d(cfg.image_latent_channels, step.cout, 3, padding=1)
        if step.role == "res":
            return ResnetBlock2D(in_channels=step.cin, out_channels=step.cout, temb_channels=4 * cfg.model_channels,
                                 groups=groups, eps=RESNET_EPS)
        if step.role == "down":
            # name="op" (as diffusers' UNet blocks) registers the conv once, as ``conv``; the default aliases it twice.
            return Downsample2D(step.cin, use_conv=True, out_channels=step.cout, padding=1, name="op")
        if step.role == "up":
            return Upsample2D(step.cin, use_conv=True, out_channels=step.cout)
        if step.role == "head":
            return ImageHead(step.cin, cfg.image_latent_channels, groups)
        raise ValueError(f"no image data layer for role {step.role!r}")

    @staticmethod
    def timestep_blocks() -> tuple[type, ...]:
        from diffusers.models.resnet import ResnetBlock2D

        return (ResnetBlock2D,)

    def zero_init_(self) -> None:
        from diffusers.models.resnet import ResnetBlock2D

        for layer in self.layers:
            if isinstance(layer, ResnetBlock2D):
                _zero_(layer.conv2)
            elif isinstance(layer, ImageHead):
                _zero_(layer.conv)

    def check_input(self, x: torch.Tensor) -> None:
        cfg = self.config
        factor = 2 ** (len(cfg.channel_mult) - 1)
        if x.ndim != 4 or x.shape[1] != cfg.image_latent_channels:
            raise UserError(
                f"image latents must be [B, {cfg.image_latent_channels}, h, w], got {list(x.shape)}: "
                "pass image-VAE latents to an image flow"
            )
        if x.shape[2] % factor or x.shape[3] % factor:
            raise UserError(f"latent size {x.shape[2]}x{x.shape[3]} is not divisible by {factor}: pick a multiple")


class TextDataLayers(DataLayers):
    """Text data layers: the same skeleton in fully-connected form, latent ``[B, D]`` -> ``[B, D]``.

    The stem maps D -> C0 * S viewed as ``[B, C0, S, 1]``; ResBlocks are :class:`FlatResBlock`; the "samplers" are
    square linear maps (the pseudo-token count never changes); the head returns ``[B, D]``.
    """

    xtype = "text"

    def make(self, step: Step) -> nn.Module:
        cfg, groups, s = self.config, self.config.norm_num_groups, self.config.second_dim
        if step.role == "stem":
            return LinearMultiDim((cfg.text_latent_dim,), (step.cout, s, 1))
        if step.role == "res":
            return FlatResBlock(step.cin, step.cout, 4 * cfg.model_channels, s, groups)
        if step.role in ("down", "up"):
            return LinearMultiDim((step.cin, s, 1), (step.cout, s, 1))
        if step.role == "head":
            return TextHead(step.cin, s, cfg.text_latent_dim, groups)
        raise ValueError(f"no text data layer for role {step.role!r}")

    @staticmethod
    def timestep_blocks() -> tuple[type, ...]:
        return (FlatResBlock,)

    def zero_init_(self) -> None:
        for layer in self.layers:
            if isinstance(layer, FlatResBlock):
                _zero_(layer.fc2)
            elif isinstance(layer, TextHead):
                _zero_(layer.linear)

    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != self.config.text_latent_dim:
            raise UserError(
                f"text latents must be [B, {self.config.text_latent_dim}], got {list(x.shape)}: "
                "pass text-VAE latents to a text flow"
            )


class ContextLayers(nn.Module):
    """The context modules of one context type: SD-v1 ``SpatialTransformer`` blocks.

    Each is diffusers' ``Transformer2DModel`` (GN -> 1x1 proj_in -> [LN self-attn, LN cross-attn to the context, LN
    GEGLU FF] -> 1x1 proj_out, outer residual), ``num_heads`` heads of width C / num_heads. It runs on H*W tokens
    of an image hidden state or on the S pseudo-tokens of a text one.
    """

    def __init__(self, ctype: str, plan: Sequence[Step], config: DiffuserConfig):
        super().__init__()
        from diffusers.models.transformers.transformer_2d import Transformer2DModel

        self.ctype = ctype
        heads = config.num_heads
        self.layers = nn.ModuleList(
            Transformer2DModel(
                num_attention_heads=heads, attention_head_dim=step.cin // heads, in_channels=step.cin,
                cross_attention_dim=config.context_dim, norm_num_groups=config.norm_num_groups,
                use_linear_projection=False,
            )
            for step in plan if step.op == "c"
        )
        if config.zero_init:
            for layer in self.layers:
                _zero_(layer.proj_out)


# --------------------------------------------------------------------------------------------------------------
# the diffuser
# --------------------------------------------------------------------------------------------------------------


class MultiFlowDiffuser(nn.Module):
    """Global layers + ``data[xtype]`` + ``context[ctype]`` on one layer sequence; an eps-predicting denoiser.

    ``forward(x, t, contexts, xtype)``: ``x`` is ``[B, 4, h, w]`` (image) or ``[B, D]`` (text), ``t`` the training
    timesteps ``[B]``, ``contexts`` one or more :class:`Context` (``[B, L, context_dim]`` tokens); returns eps of
    ``x``'s shape. :meth:`apply_flow` is the same by flow name with checked inputs.
    """

    prediction_type = "eps"
    learned_variance = False

    def __init__(self, config: Optional[DiffuserConfig] = None):
        super().__init__()
        self.config = (config or DiffuserConfig()).validate()
        self.plan = layer_plan(self.config)
        self.sequence = "".join(step.op for step in self.plan)
        self.global_layers = GlobalLayers(self.config.model_channels)
        self.data = nn.ModuleDict({
            "image": ImageDataLayers(self.plan, self.config),
            "text": TextDataLayers(self.plan, self.config),
        })
        self.context = nn.ModuleDict({ctype: ContextLayers(ctype, self.plan, self.config) for ctype in CONTEXT_TYPES})
        self.gradient_checkpointing = False
        self._check_alignment()

    def _check_alignment(self) -> None:
        """Every data set has one module per ``d`` and every context set one per ``c`` ([R] ``check_diffuser``)."""
        sets = [(f"data {k}", v, "d") for k, v in self.data.items()]
        sets += [(f"context {k}", v, "c") for k, v in self.context.items()]
        for name, layers, op in sets:
            if len(layers.layers) != self.sequence.count(op):
                raise RuntimeError(f"{name}: {len(layers.layers)} modules for {self.sequence.count(op)} '{op}' slots")

    # ---------------------------------------------------------------- groups

    def group_modules(self) -> dict[str, nn.Module]:
        """The five layer groups of the paper's Fig. 3 (and Table 1's gradient scales), by name."""
        return {
            "global": self.global_layers,
            "data_image": self.data["image"],
            "data_text": self.data["text"],
            "ctx_image": self.context["image"],
            "ctx_text": self.context["text"],
        }

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {name: list(module.parameters()) for name, module in self.group_modules().items()}

    def enable_gradient_checkpointing(self) -> None:
        """Recompute every data and context module in the backward pass (the shared trainer's switch)."""
        self.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = False

    # ---------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor, t: torch.Tensor, contexts: Sequence[Context], xtype: str) -> torch.Tensor:
        """eps_theta(x_t, t, c; flow): one pass along the layer sequence (METHOD.md, "Routing"; paper §3.3).

        At every context slot k the active context modules are mixed inside the layer (paper §3.3,
        "attention-level" mixing; [R] ``context_mixing``, [D] ``DualTransformer2DModel``): with weights
        normalised to sum 1, ``h <- h + sum_i r_i (T_k^{type_i}(h, c_i) - h)``. A context of weight 0 is not run,
        and a single remaining context is applied as ``h <- T_k(h, c)`` exactly, so a mixture with ratio 0 or 1
        is bit-identical to the pure single-context flow.
        """
        if xtype not in self.data:
            raise UserError(f"unknown data type {xtype!r}: choose image or text")
        data = self.data[xtype]
        data.check_input(x)
        mixture = self._normalise_contexts(contexts, x.shape[0])
        t = _batch_timesteps(t, x)
        emb = self.global_layers(t, x.dtype)

        h, skips, d_index, c_index = x, [], 0, 0
        for op in self.sequence:
            if op == "d":
                layer = data.layers[d_index]
                h = self._call(layer, h, emb) if data.takes_emb[d_index] else self._call(layer, h)
                d_index += 1
            elif op == "c":
                h = self._mix_slot(c_index, h, mixture)
                c_index += 1
            elif op == "S":
                skips.append(h)
            else:
                h = torch.cat([h, skips.pop()], dim=1)
        return h

    def apply_flow(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        flow: Union[str, Flow],
        text: Optional[torch.Tensor] = None,
        image: Optional[torch.Tensor] = None,
        text_ratio: Optional[float] = None,
    ) -> torch.Tensor:
        """eps for a named flow; ``text`` / ``image`` are context tokens, ``text_ratio`` the dual-guidance weight.

        Keyword inputs match :class:`common.denoisers.CFGDenoiser`'s conditioning dicts, so
        ``CFGDenoiser(partial(model.apply_flow, flow="t2i"), {"text": c}, {"text": u}, scale)`` is the flow's
        classifier-free-guided denoiser.
        """
        return self(x, t, flow_contexts(flow, text=text, image=image, text_ratio=text_ratio), resolve_flow(flow).xtype)

    def _call(self, layer: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    def context_slot(self, k: int, h: torch.Tensor, contexts: Sequence[Context]) -> torch.Tensor:
        """Context slot ``k`` alone: ``h + sum_i r_i (T_k^{type_i}(h, c_i) - h)`` (paper §3.3), ``h`` its input.

        ``h`` is ``[B, C, h, w]`` (image data) or ``[B, C, S, 1]`` (text data) at slot k's width.
        """
        return self._mix_slot(k, h, self._normalise_contexts(contexts, h.shape[0]))

    def _mix_slot(self, k: int, h: torch.Tensor, mixture: Sequence[tuple[str, torch.Tensor, float]]) -> torch.Tensor:
        def run(ctype: str, tokens: torch.Tensor) -> torch.Tensor:
            block = self.context[ctype].layers[k]
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                return checkpoint(lambda a, b: block(a, encoder_hidden_states=b, return_dict=False)[0], h, tokens,
                                  use_reentrant=False)
            return block(h, encoder_hidden_states=tokens, return_dict=False)[0]

        if len(mixture) == 1:
            ctype, tokens, _ = mixture[0]
            return run(ctype, tokens)
        out = h
        for ctype, tokens, ratio in mixture:
            out = out + ratio * (run(ctype, tokens) - h)
        return out

    def _normalise_contexts(self, contexts: Sequence[Context], batch: int) -> list[tuple[str, torch.Tensor, float]]:
        if isinstance(contexts, Context):
            contexts = [contexts]
        if not contexts:
            raise UserError("a forward pass needs at least one context (text or image tokens)")
        weights = []
        for ctx in contexts:
            if ctx.kind not in self.context:
                raise UserError(f"unknown context type {ctx.kind!r}: choose text or image")
            w = float(ctx.weight)
            if not math.isfinite(w) or w < 0:
                raise UserError(f"context weight {ctx.weight} for {ctx.kind} must be a finite number >= 0")
            tokens = ctx.tokens
            if tokens.ndim != 3 or tokens.shape[0] != batch or tokens.shape[-1] != self.config.context_dim:
                raise UserError(
                    f"{ctx.kind} context must be [{batch}, L, {self.config.context_dim}], got {list(tokens.shape)}: "
                    "encode it with the matching CLIP context encoder"
                )
            weights.append(w)
        total = sum(weights)
        if total <= 0:
            raise UserError("context weights sum to 0: give at least one context a positive weight")
        # Normalised as [R] context_mixing (ratios (2, 2) == (0.5, 0.5)); weight-0 contexts are skipped entirely.
        return [(c.kind, c.tokens, w / total) for c, w in zip(contexts, weights) if w > 0]


def flow_contexts(
    flow: Union[str, Flow],
    text: Optional[torch.Tensor] = None,
    image: Optional[torch.Tensor] = None,
    text_ratio: Optional[float] = None,
) -> list[Context]:
    """The :class:`Context` list of a flow, checking that exactly the flow's context inputs are given."""
    flow = resolve_flow(flow)
    given = {"text": text, "image": image}
    for kind, value in given.items():
        if value is None and kind in flow.ctypes:
            raise UserError(f"flow {flow.name} ({flow.description}) needs a {kind} context: pass {kind}=...")
        if value is not None and kind not in flow.ctypes:
            raise UserError(
                f"flow {flow.name} ({flow.description}) takes no {kind} input: drop it, or use a flow "
                f"conditioned on {kind} ({', '.join(f.name for f in FLOWS.values() if kind in f.ctypes)})"
            )
    if flow.name == "dual":
        ratio = 0.5 if text_ratio is None else check_ratio(text_ratio)
        return [Context("text", text, ratio), Context("image", image, 1.0 - ratio)]
    if text_ratio is not None:
        raise UserError(f"text_ratio only applies to the dual flow, not {flow.name}: drop it")
    kind = flow.ctypes[0]
    return [Context(kind, given[kind])]


def check_ratio(ratio: float) -> float:
    """A dual-guidance mixing ratio must lie in [0, 1] (0 = image only, 1 = text only)."""
    value = float(ratio)
    if not (0.0 <= value <= 1.0):
        raise UserError(f"text ratio {ratio} is outside [0, 1]: 0 = image context only, 1 = text context only")
    return value


def _batch_timesteps(t: Union[torch.Tensor, int, float], x: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise UserError(f"timesteps must be a scalar or [B] = [{x.shape[0]}], got {list(t.shape)}")
    return t


# --------------------------------------------------------------------------------------------------------------
# parameter counts
# --------------------------------------------------------------------------------------------------------------


def count_parameters(model: MultiFlowDiffuser) -> dict[str, int]:
    """Parameters per group (METHOD.md, "Parameter counts") plus ``total`` (each parameter counted once)."""
    counts = {name: sum(p.numel() for p in params) for name, params in model.parameter_groups().items()}
    counts["total"] = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return counts


def flow_parameter_count(model: MultiFlowDiffuser, flow: Union[str, Flow]) -> int:
    """Parameters a flow runs through: global + its data set + its context set(s)."""
    counts = count_parameters(model)
    return sum(counts[group] for group in resolve_flow(flow).groups)


def build_diffuser(config: Union[DiffuserConfig, Mapping, None] = None, device=None) -> MultiFlowDiffuser:
    """A :class:`MultiFlowDiffuser`; ``device="meta"`` builds the full-size model without allocating memory."""
    if isinstance(config, Mapping):
        config = DiffuserConfig(**config)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return MultiFlowDiffuser(config)


def _zero_(layer: nn.Module) -> None:
    """Zero a layer's weight and bias ([R] ``zero_module``): a fresh block starts as the identity on its residual."""
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
