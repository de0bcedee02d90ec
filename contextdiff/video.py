"""ContextDiff for text-guided video editing (METHOD.md, "Video editing"): the paper's method, not the released code's.

Pieces, all on the image model's own weights:

- :class:`VideoUNet` inflates a diffusers ``UNet2DConditionModel`` over time without copying it. Latents
  ``[B, C, F, h, w]`` are folded to ``[B F, C, h, w]``, so every spatial layer (convs, norms, cross-attention to the
  text) is shared by the frames. Two temporal pieces make the frames see each other (Tune-A-Video, Wu et al. 2023):

  * sparse-causal self-attention: each frame's queries attend to the keys / values of the FIRST frame and of the
    PREVIOUS frame (``[0, i - 1]``; frame 0 attends to itself twice, which is plain self-attention), set as the
    ``attn1`` processor of every transformer block (:class:`SparseCausalAttnProcessor`);
  * a temporal attention after every transformer block: at each spatial position, attention over the frames,
    with a zero-initialised output projection (:class:`TemporalAttention`), added by a forward hook.

  With the temporal outputs at zero and ``sparse_causal=False`` every frame's output equals the image model's bit
  for bit; with sparse-causal attention frame 0 (and any frame of a still clip) still does (tests).
- :class:`VideoRelationalNet` is the image adapter ``r_phi`` applied per frame (frames folded into the batch, the
  text repeated per frame), plus a zero-initialised temporal attention over frames on its tokens after the last
  block, so ``r`` has the video's shape and depends on every frame and the text. The released ``CLIPLocalShift``
  attended with one repeated text key and so ignored the video.
- The process is the image one (``contextdiff.process``): ``x_t = sqrt(abar) x0 + k_t r + sqrt(1 - abar) eps`` with
  ``r = r_phi(video, text)``. One-shot tuning (:func:`tune_on_video`) minimises the shifted-eps loss on the source
  clip; contextualized DDIM inversion of the source (:func:`invert_video`) and contextualized DDIM sampling with the
  edited prompt (:func:`sample_video`) both re-estimate ``r_hat = r_phi(x0_hat, c)`` at every step through the core's
  shift hook. The released code only adds ``0.018125 r`` to the training noise and never uses it in inversion or
  sampling; ``shift_in="train"`` reproduces that for comparison.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from common.errors import UserError
from common.latents import decode_latents, encode_images
from common.modules import WrapsUNet
from common.samplers import invert_ddim, sample_ddim
from contextdiff.adapter import Attention, RelationalNet
from contextdiff.process import ContextLossConfig, contextual_loss


SHIFT_MODES = ("all", "train", "none")  # where the contextual shift is used: everywhere / training only / nowhere


# ------------------------------------------------------------------------------------------------ building blocks


@dataclass
class FrameState:
    """The number of frames of the forward pass in flight (None outside a video forward: image behaviour)."""

    frames: Optional[int] = None


def frame_positions(frames: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Fixed 1-D sine-cosine code of the frame index, ``[frames, dim]`` (dim even)."""
    half = dim // 2
    freqs = 1.0 / (10000 ** (torch.arange(half, device=device, dtype=torch.float64) / max(half, 1)))
    angles = torch.arange(frames, device=device, dtype=torch.float64)[:, None] * freqs[None]
    code = torch.cat([angles.sin(), angles.cos()], dim=1)
    if code.shape[1] < dim:
        code = torch.cat([code, code.new_zeros(frames, dim - code.shape[1])], dim=1)
    return code.to(dtype)


class TemporalAttention(nn.Module):
    """Attention over frames at every token: ``[B F, N, dim] -> [B F, N, dim]`` residual, zero at init.

    Tokens are regrouped to ``[B N, F, dim]``, normalised, given a frame-index code, attend to each other (all
    frames, both directions, as Tune-A-Video's ``attn_temp``), and the zero-initialised output projection makes the
    residual exactly 0 until it is trained.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        heads = heads if dim % heads == 0 else 1
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        nn.init.zeros_(self.attn.to_out.weight)
        nn.init.zeros_(self.attn.to_out.bias)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        bf, n, d = x.shape
        b = bf // frames
        tokens = x.reshape(b, frames, n, d).transpose(1, 2).reshape(b * n, frames, d)
        tokens = self.norm(tokens) + frame_positions(frames, d, x.device, x.dtype)
        out = self.attn(tokens)
        return out.reshape(b, n, frames, d).transpose(1, 2).reshape(bf, n, d)


def sparse_causal_index(frames: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """For every frame i: the frame whose keys come first (0) and second (``max(i - 1, 0)``)."""
    first = torch.zeros(frames, dtype=torch.long, device=device)
    previous = (torch.arange(frames, device=device) - 1).clamp(min=0)
    return first, previous


class SparseCausalAttnProcessor:
    """``attn1`` processor: queries of frame i attend to keys / values of frames ``[0, i - 1]`` (Tune-A-Video).

    Works on a diffusers ``Attention`` used as self-attention on ``[B F, N, dim]`` tokens (SD's transformer blocks:
    no group / spatial norm). Outside a video forward (``state.frames`` None) or for one frame it is plain
    self-attention.
    """

    def __init__(self, state: FrameState):
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("the sparse-causal processor is for unmasked self-attention (attn1) only")
        if getattr(attn, "group_norm", None) is not None or getattr(attn, "spatial_norm", None) is not None:
            raise ValueError("the sparse-causal processor does not support attention with group or spatial norm")
        residual = hidden_states
        if hidden_states.ndim == 4:  # [B, C, H, W] inputs are tokens too
            b4, c4, h4, w4 = hidden_states.shape
            hidden_states = hidden_states.view(b4, c4, h4 * w4).transpose(1, 2)
        bf, n, _ = hidden_states.shape
        frames = self.state.frames or 1
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        if frames > 1:
            b = bf // frames
            first, previous = sparse_causal_index(frames, hidden_states.device)

            def gather(t: torch.Tensor) -> torch.Tensor:  # [B F, N, D] -> [B F, 2N, D]
                t = t.view(b, frames, n, t.shape[-1])
                return torch.cat([t[:, first], t[:, previous]], dim=2).reshape(bf, 2 * n, t.shape[-1])

            key, value = gather(key), gather(value)
        heads = attn.heads
        inner = key.shape[-1]

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(bf, -1, heads, inner // heads).transpose(1, 2)

        query, key, value = split(query), split(key), split(value)
        if getattr(attn, "norm_q", None) is not None:
            query = attn.norm_q(query)
        if getattr(attn, "norm_k", None) is not None:
            key = attn.norm_k(key)
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=attn.scale)
        out = out.transpose(1, 2).reshape(bf, n, inner).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if residual.ndim == 4:
            out = out.transpose(-1, -2).reshape(residual.shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _transformer_blocks(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    from diffusers.models.attention import BasicTransformerBlock

    return [(name, m) for name, m in unet.named_modules() if isinstance(m, BasicTransformerBlock)]


# ---------------------------------------------------------------------------------------------------- video UNet


class VideoUNet(WrapsUNet):
    """An image ``UNet2DConditionModel`` inflated over time; ``forward(x [B, C, F, h, w], t, text [B, L, D])``.

    Args:
        unet: the image UNet (its weights are used as they are; hooks and processors are installed on it).
        sparse_causal: sparse-causal self-attention (first + previous frame) instead of per-frame self-attention.
        temporal: add a zero-initialised :class:`TemporalAttention` after every transformer block.

    It presents the UNet's interface to the samplers and the loss (``config``, ``dtype``, ``device``,
    ``return_dict``), so ``contextdiff.process.contextual_loss`` and ``common.samplers`` run on it unchanged.
    """

    def __init__(self, unet: nn.Module, sparse_causal: bool = True, temporal: bool = True):
        super().__init__()
        self.unet = unet
        self.state = FrameState()
        self.sparse_causal, self.has_temporal = sparse_causal, temporal
        blocks = _transformer_blocks(unet)
        if not blocks:
            raise UserError("this UNet has no transformer blocks (no attention): it cannot be inflated over time; "
                            "use a UNet2DConditionModel with CrossAttn blocks")
        self.temporal = nn.ModuleDict()
        self._hooks = []
        for name, block in blocks:
            if sparse_causal:
                block.attn1.set_processor(SparseCausalAttnProcessor(self.state))
            if temporal:
                key = name.replace(".", "_")
                self.temporal[key] = TemporalAttention(block.attn1.to_q.in_features, block.attn1.heads)
                self._hooks.append(block.register_forward_hook(self._temporal_hook(self.temporal[key])))

    def _temporal_hook(self, layer: TemporalAttention):
        def hook(module, args, output):
            frames = self.state.frames
            if frames is None or not isinstance(output, torch.Tensor) or output.ndim != 3:
                return output
            return output + layer(output, frames)

        return hook

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, return_dict: bool = True,
                **kwargs: Any):
        if sample.ndim != 5:
            raise UserError(f"the video UNet takes latents [B, C, F, h, w], got shape {tuple(sample.shape)}")
        b, c, f, h, w = sample.shape
        x = sample.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.reshape(()).expand(b) if t.numel() == 1 else t  # one timestep for the batch, or one per sample
        t = t.repeat_interleave(f)
        text = encoder_hidden_states.repeat_interleave(f, dim=0)
        self.state.frames = f
        try:
            out = self.unet(x, t, encoder_hidden_states=text, return_dict=False, **kwargs)[0]
        finally:
            self.state.frames = None
        out = out.reshape(b, f, *out.shape[1:]).permute(0, 2, 1, 3, 4)
        if not return_dict:
            return (out,)
        from types import SimpleNamespace

        return SimpleNamespace(sample=out)

    def set_trainable(self, temporal: bool = True, query: bool = True) -> list[str]:
        """Tune-A-Video's per-video trainable set: the temporal attentions and every transformer attention's
        ``to_q``; everything else frozen. Returns the names of the trainable parameters."""
        self.requires_grad_(False)
        if temporal:
            self.temporal.requires_grad_(True)
        if query:
            for _, block in _transformer_blocks(self.unet):
                for attn_name in ("attn1", "attn2"):
                    attn = getattr(block, attn_name, None)
                    if attn is not None:
                        attn.to_q.requires_grad_(True)
        return [name for name, p in self.named_parameters() if p.requires_grad]


# ------------------------------------------------------------------------------------------------- video adapter


class VideoRelationalNet(nn.Module):
    """r_phi(video, c): the image :class:`RelationalNet` per frame plus a temporal attention over its tokens.

    ``forward(x0 [B, C, F, h, w], text, text_masks=None) -> r [B, C, F, h, w]``; ``text`` is what the image adapter
    takes (one ``[B, L_i, D_i]`` per source), repeated per frame here. The temporal layer (after the last block, zero
    output at init) lets a frame's bias depend on the other frames; at init ``r`` is the image adapter's per frame.
    """

    def __init__(self, image_adapter: RelationalNet, temporal: bool = True):
        super().__init__()
        if getattr(image_adapter.config, "time_aware", False):
            raise UserError("video editing builds its adapter from a t-free image adapter; this checkpoint's adapter "
                            "is time-aware (r_phi(x0, c, t)): use a checkpoint trained without --adapter_time_aware")
        self.image = image_adapter
        self.state = FrameState()
        self.temporal = TemporalAttention(image_adapter.config.dim, image_adapter.config.heads) if temporal else None
        self._hook = None
        if temporal:
            self._hook = image_adapter.blocks[-1].register_forward_hook(self._hook_fn)

    def _hook_fn(self, module, args, output):
        frames = self.state.frames
        if frames is None or self.temporal is None:
            return output
        return output + self.temporal(output, frames)

    @property
    def config(self):
        return self.image.config

    @property
    def dtype(self) -> torch.dtype:
        return self.image.dtype

    def check_compatible(self, latent_channels=None, text_dims=None) -> None:
        self.image.check_compatible(latent_channels, text_dims)

    def forward(self, x0: torch.Tensor, text, text_masks=None) -> torch.Tensor:
        if x0.ndim != 5:
            raise UserError(f"the video adapter takes latents [B, C, F, h, w], got shape {tuple(x0.shape)}")
        b, c, f, h, w = x0.shape
        frames = x0.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        states = [text] if isinstance(text, torch.Tensor) else list(text)
        states = [s.repeat_interleave(f, dim=0) for s in states]
        masks = None if text_masks is None else [None if m is None else m.repeat_interleave(f, dim=0)
                                                 for m in text_masks]
        self.state.frames = f
        try:
            r = self.image(frames, states, masks)
        finally:
            self.state.frames = None
        return r.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)


# ---------------------------------------------------------------------------------------------------- memory


def available_memory_bytes(device: torch.device | str = "cpu") -> int:
    """Free memory of the device: CUDA's free bytes, else the host's ``MemAvailable`` (total RAM as a fallback)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def activation_bytes_per_frame(unet: VideoUNet, adapter: Optional[VideoRelationalNet], latent_hw: tuple[int, int],
                               text: torch.Tensor) -> int:
    """Bytes autograd keeps per frame for one tuning step, measured on a 2-frame forward (saved-tensor hooks).

    That is what the tuning step's memory grows with; inversion and sampling need less (no graph).
    """
    total = [0]
    seen: set[int] = set()

    def pack(t: torch.Tensor):
        key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            total[0] += t.untyped_storage().nbytes()
        return t

    c = unet.config.in_channels
    x = torch.zeros(1, c, 2, *latent_hw, device=unet.device, dtype=unet.dtype)
    t = torch.full((1,), 500, device=unet.device, dtype=torch.long)
    grads = [p.requires_grad for p in unet.parameters()]
    ad_grads = [p.requires_grad for p in adapter.parameters()] if adapter is not None else []
    unet.requires_grad_(True)
    if adapter is not None:
        adapter.requires_grad_(True)
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if adapter is not None:
                adapter(x, text.to(unet.dtype))
            unet(x, t, encoder_hidden_states=text.to(unet.dtype), return_dict=False)
    finally:
        for p, g in zip(unet.parameters(), grads):
            p.requires_grad_(g)
        if adapter is not None:
            for p, g in zip(adapter.parameters(), ad_grads):
                p.requires_grad_(g)
    return max(1, total[0] // 2)


def max_frames_for_memory(per_frame_bytes: int, available_bytes: int, fraction: float = 0.5) -> int:
    """Frames one tuning step can afford: ``fraction`` of the free memory over the measured bytes per frame (a
    2x margin by default, for the optimizer, the temporaries autograd does not save and the decoder)."""
    return max(0, int(fraction * available_bytes // max(per_frame_bytes, 1)))


# ---------------------------------------------------------------------------------------------------- editing


@dataclass
class VideoEditConfig:
    """The settings of one edit (the script's flags).

    shift: ``all`` (the paper: the shift in tuning, inversion and sampling), ``train`` (the released code: tuning
        only) or ``none`` (plain Tune-A-Video; the equal-budget ablation).
    """

    steps: int = 25
    guidance_scale: float = 3.0
    train_steps: int = 60
    learning_rate: float = 1e-4
    seed: int = 0
    shift: str = "all"
    fixed_point_iters: int = 2
    sparse_causal: bool = True
    temporal: bool = True
    train_adapter: bool = True
    progress: bool = True

    def __post_init__(self):
        if self.shift not in SHIFT_MODES:
            raise UserError(f"unknown shift mode {self.shift!r}: choose one of {', '.join(SHIFT_MODES)}")
        if self.steps < 1:
            raise UserError(f"--num_inference_steps must be >= 1, got {self.steps}")
        if self.train_steps < 0:
            raise UserError(f"--train_steps must be >= 0, got {self.train_steps}")
        if self.learning_rate <= 0:
            raise UserError(f"--learning_rate must be > 0, got {self.learning_rate}")
        if self.guidance_scale < 1.0:
            raise UserError(f"--guidance_scale must be >= 1 (1 = no guidance), got {self.guidance_scale}")
        if self.fixed_point_iters < 0:
            raise UserError(f"--fixed_point_iters must be >= 0, got {self.fixed_point_iters}")


@dataclass
class VideoEditOutput:
    edited: np.ndarray  # uint8 [F, H, W, 3]
    source: np.ndarray  # uint8 [F, H, W, 3] (the frames as the model saw them)
    reconstruction: Optional[np.ndarray]  # uint8 [F, H, W, 3], source prompt from the inverted latents
    source_latents: torch.Tensor  # [1, C, F, h, w]
    inverted: torch.Tensor  # x_T [1, C, F, h, w]
    train_losses: list[float]


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 ``[F, H, W, 3]`` -> float ``[F, 3, H, W]`` in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0


def tensor_to_frames(images: torch.Tensor) -> np.ndarray:
    """float ``[F, 3, H, W]`` in [0, 1] -> uint8 ``[F, H, W, 3]``."""
    return (images.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def encode_video(vae: nn.Module, frames: np.ndarray) -> torch.Tensor:
    """uint8 frames ``[F, H, W, 3]`` -> scaled latents ``[1, C, F, h, w]`` (the posterior mean, frame by frame)."""
    images = frames_to_tensor(frames).to(vae.device, vae.dtype)
    latents = encode_images(vae, images)
    return latents.permute(1, 0, 2, 3).unsqueeze(0)


@torch.no_grad()
def decode_video(vae: nn.Module, latents: torch.Tensor) -> np.ndarray:
    """Scaled latents ``[1, C, F, h, w]`` -> uint8 frames ``[F, H, W, 3]``."""
    return tensor_to_frames(decode_latents(vae, latents[0].permute(1, 0, 2, 3)))


def tune_on_video(
    unet: VideoUNet,
    adapter: Optional[VideoRelationalNet],
    latents: torch.Tensor,
    text: torch.Tensor,
    schedule,
    *,
    train_steps: int,
    learning_rate: float,
    seed: int = 0,
    shift: bool = True,
    train_adapter: bool = True,
    k_schedule: str = "quadratic",
    k_scale: float = 1.0,
    parameterization: str = "shifted_eps",
    progress: bool = True,
) -> list[float]:
    """One-shot tuning on the source clip (Tune-A-Video) with ContextDiff's loss (METHOD.md, "loss"), on the shared Trainer.

    ``latents [1, C, F, h, w]`` (scaled), ``text [1, L, D]`` (the source caption's CLIP states). Trainable: the
    temporal attentions and every attention ``to_q`` (:meth:`VideoUNet.set_trainable`), plus the whole video adapter
    when ``shift`` and ``train_adapter``. With ``shift=False`` the process has k = 0 (plain DDPM loss, the adapter
    untouched): the same steps on the same UNet parameters, the ablation at equal budget. Returns the losses.
    """
    from common.train import TrainConfig, Trainer

    if train_steps == 0:
        return []
    if adapter is None and shift:
        raise UserError("tuning with the contextual shift needs the video adapter: load a ContextDiff checkpoint")
    unet.set_trainable()
    loss_config = ContextLossConfig(stage=1, parameterization=parameterization,
                                    k_schedule=k_schedule if shift else "none", k_scale=k_scale)
    models: dict[str, nn.Module] = {"unet": unet}
    frozen: dict[str, nn.Module] = {}
    if adapter is not None:
        if shift and train_adapter:
            adapter.requires_grad_(True)
            models["adapter"] = adapter
        else:
            adapter.requires_grad_(False)
            frozen["adapter"] = adapter
    dataset = [{"latents": latents[0].detach(), "encoder_hidden_states": text[0].detach(),
                "adapter_text": text[0].detach()}]

    def loss_fn(batch, ctx):
        return contextual_loss(batch, ctx.models["unet"], ctx.models.get("adapter", _ZeroAdapter()), schedule,
                               loss_config)

    with tempfile.TemporaryDirectory(prefix="video-tune-") as tmp:
        config = TrainConfig(output_dir=tmp, seed=seed, train_batch_size=1, max_train_steps=train_steps,
                             learning_rate=learning_rate, lr_warmup_steps=0, lr_scheduler="constant",
                             report_to="none", checkpointing_steps=10 * train_steps + 10,
                             validation_steps=10 * train_steps + 10, adam_weight_decay=0.0).validate()
        with Trainer(config) as trainer:
            result = trainer.fit(models, loss_fn, dataset, frozen=frozen)
    unet.requires_grad_(False).eval()
    if adapter is not None:
        adapter.requires_grad_(False).eval()
    return list(result.loss_history)


class _ZeroAdapter(nn.Module):
    """r == 0 (a video without an adapter: only used with k = 0)."""

    def forward(self, x0, text, text_masks=None):
        return torch.zeros_like(x0)


def _setup(unet, adapter, text_encoder, tokenizer, prompt, *, steps, guidance_scale, scheduler_config,
           parameterization, k_schedule, k_scale, shift):
    from contextdiff.pipeline import sampling_setup as image_setup

    return image_setup(unet, adapter, text_encoder, tokenizer, [prompt], steps=steps, guidance_scale=guidance_scale,
                       sampler="ddim", scheduler_config=scheduler_config, parameterization=parameterization,
                       k_schedule=k_schedule, k_scale=k_scale, negative_prompt="", t5=None, t5_max_length=77,
                       no_shift=not shift or adapter is None)


@torch.no_grad()
def invert_video(unet: VideoUNet, adapter, text_encoder, tokenizer, prompt: str, latents: torch.Tensor, *,
                 steps: int, scheduler_config: dict, parameterization: str, k_schedule: str = "quadratic",
                 k_scale: float = 1.0, shift: bool = True, fixed_point_iters: int = 2,
                 progress: bool = False) -> torch.Tensor:
    """Contextualized DDIM inversion of the source latents ``[1, C, F, h, w]`` with the source prompt (conditional
    only, as Tune-A-Video / FateZero), ``r_hat = r_phi(x0_hat, c)`` in every step when ``shift``. Returns x_T."""
    s = _setup(unet, adapter, text_encoder, tokenizer, prompt, steps=steps, guidance_scale=1.0,
               scheduler_config=scheduler_config, parameterization=parameterization, k_schedule=k_schedule,
               k_scale=k_scale, shift=shift)
    return invert_ddim(s.denoiser, s.schedule, s.plan, latents.to(unet.dtype), shift=s.shift,
                       fixed_point_iters=fixed_point_iters, progress=progress)


@torch.no_grad()
def sample_video(unet: VideoUNet, adapter, text_encoder, tokenizer, prompt: str, x_T: torch.Tensor, *, steps: int,
                 guidance_scale: float, scheduler_config: dict, parameterization: str, k_schedule: str = "quadratic",
                 k_scale: float = 1.0, shift: bool = True, progress: bool = False) -> torch.Tensor:
    """Contextualized DDIM sampling (eta = 0) from ``x_T [1, C, F, h, w]`` with ``prompt``, CFG batched once per
    step and one ``r_hat`` on the guided x0_hat (METHOD.md, "CFG + shift"). Returns the clean latents."""
    s = _setup(unet, adapter, text_encoder, tokenizer, prompt, steps=steps, guidance_scale=guidance_scale,
               scheduler_config=scheduler_config, parameterization=parameterization, k_schedule=k_schedule,
               k_scale=k_scale, shift=shift)
    return sample_ddim(s.denoiser, s.schedule, s.plan, x_T=x_T, shift=s.shift, progress=progress,
                       device=x_T.device, dtype=unet.dtype)


def inflate(model, config: VideoEditConfig) -> tuple[VideoUNet, Optional[VideoRelationalNet]]:
    """The video UNet and video adapter of a loaded :class:`contextdiff.checkpoint.ContextDiffModel`."""
    unet = VideoUNet(model.unet, sparse_causal=config.sparse_causal, temporal=config.temporal)
    adapter = None if model.adapter is None else VideoRelationalNet(model.adapter, temporal=config.temporal)
    return unet, adapter


def check_frame_budget(n_frames: int, max_frames: int, detail: str = "") -> None:
    if n_frames > max_frames:
        raise UserError(f"{n_frames} frames exceed the limit of {max_frames} frames{detail}: pass --n_frames "
                        f"{max_frames} or fewer (or a smaller --resolution)")


def edit_video(
    model,
    frames: np.ndarray,
    source_prompt: str,
    target_prompt: str,
    config: Optional[VideoEditConfig] = None,
    *,
    reconstruct: bool = False,
    video: Optional[tuple[VideoUNet, Optional[VideoRelationalNet]]] = None,
) -> VideoEditOutput:
    """Tune on ``frames`` (uint8 ``[F, H, W, 3]`` at the model's resolution), invert them with the source prompt
    and sample the target prompt from the inverted latents (Tune-A-Video with ContextDiff's shift).

    ``model``: a loaded ``ContextDiffModel`` (its UNet and adapter are inflated in place: load a fresh one per
    edit, or pass ``video=(video_unet, video_adapter)`` built by :func:`inflate`). ``reconstruct`` also samples the
    source prompt (guidance 1) from the inverted latents.
    """
    from common.pipeline import encode_clip
    from common.schedule import NoiseSchedule

    config = VideoEditConfig() if config is None else config
    unet, adapter = video if video is not None else inflate(model, config)
    use_shift_train = config.shift in ("all", "train") and adapter is not None
    use_shift_sample = config.shift == "all" and adapter is not None
    schedule = NoiseSchedule.from_config(model.scheduler_config)
    latents = encode_video(model.vae, frames)
    text = encode_clip(model.text_encoder, model.tokenizer, [source_prompt])
    with torch.random.fork_rng(devices=[]):
        losses = tune_on_video(unet, adapter, latents, text, schedule, train_steps=config.train_steps,
                               learning_rate=config.learning_rate, seed=config.seed, shift=use_shift_train,
                               train_adapter=config.train_adapter, k_schedule=model.k_schedule,
                               k_scale=model.k_scale, parameterization=model.parameterization,
                               progress=config.progress)
    common = dict(steps=config.steps, scheduler_config=model.scheduler_config,
                  parameterization=model.parameterization, k_schedule=model.k_schedule, k_scale=model.k_scale,
                  shift=use_shift_sample, progress=config.progress)
    x_T = invert_video(unet, adapter, model.text_encoder, model.tokenizer, source_prompt, latents,
                       fixed_point_iters=config.fixed_point_iters, **common)
    edited = sample_video(unet, adapter, model.text_encoder, model.tokenizer, target_prompt, x_T,
                          guidance_scale=config.guidance_scale, **common)
    recon = None
    if reconstruct:
        recon_latents = sample_video(unet, adapter, model.text_encoder, model.tokenizer, source_prompt, x_T,
                                     guidance_scale=1.0, **common)
        recon = decode_video(model.vae, recon_latents)
    return VideoEditOutput(decode_video(model.vae, edited), frames, recon, latents, x_T, losses)


def structure_scores(source: np.ndarray, edited: np.ndarray, threshold: float = 0.35) -> dict:
    """How much of the source's layout an edit kept: IoU of the stroke masks (brightness = max over RGB above
    ``threshold``, the digits world's mask rule) and the correlation of the brightness maps, averaged over frames."""
    a = source.astype(np.float64).max(axis=-1) / 255.0
    b = edited.astype(np.float64).max(axis=-1) / 255.0
    ious, corrs = [], []
    for fa, fb in zip(a, b):
        ma, mb = fa > threshold, fb > threshold
        union = (ma | mb).sum()
        ious.append(float((ma & mb).sum() / union) if union else 1.0)
        da, db = fa - fa.mean(), fb - fb.mean()
        denom = math.sqrt(float((da * da).sum() * (db * db).sum()))
        corrs.append(float((da * db).sum() / denom) if denom > 0 else 0.0)
    return {"stroke_iou": float(np.mean(ious)), "brightness_corr": float(np.mean(corrs))}


def judge_video(frames: np.ndarray, digit: Optional[int], color: Optional[str]) -> dict:
    """The digits judge on every frame against one (digit, colour) target."""
    from common.judge import judge_images

    scores = judge_images(list(frames), [(digit, color)] * len(frames))
    return {k: scores[k] for k in ("digit_accuracy", "color_accuracy", "both_accuracy")}


def frame_consistency(frames: np.ndarray) -> float:
    """Mean similarity of consecutive frames (``common.metrics.frames``, pixel mode: 1 - mean |f_t - f_t+1|)."""
    from common.metrics.frames import pixel_frame_consistency

    return float(pixel_frame_consistency(torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2))["mean"])


def video_scores(source: np.ndarray, edited: np.ndarray, digit: Optional[int], color: Optional[str],
                 clip_models=None, target_prompt: Optional[str] = None) -> dict:
    """Judge (digit / colour of the target), frame consistency and structure kept, for one edited clip; with
    ``clip_models`` (``{name: (model, preprocess, tokenizer)}``) also the papers' CLIP metrics: CLIP frame
    consistency (consecutive pairs) and, with ``target_prompt``, CLIP text alignment of the edited frames."""
    scores = {**judge_video(edited, digit, color), "frame_consistency": frame_consistency(edited),
              "source_frame_consistency": frame_consistency(source), **structure_scores(source, edited)}
    if clip_models is not None:
        from common.metrics.clip import clip_scores
        from common.metrics.frames import clip_frame_consistency

        video = torch.from_numpy(np.ascontiguousarray(edited)).permute(0, 3, 1, 2)
        scores["clip_frame_consistency"] = float(clip_frame_consistency(video, clip_models)["mean"])
        if target_prompt is not None:
            scores["clip_text_alignment"] = float(clip_scores(video, [target_prompt] * len(edited), clip_models)["mean"])
    return scores
