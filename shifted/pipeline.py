"""Text -> CLIP image embedding with the shifted-diffusion prior (equations in METHOD.md); its training loss is in
``shifted/training.py``.

Sampling (METHOD.md, "Reverse DDPM" / "Reverse DDIM"): choose the bank component from the CLIP text embedding, start at
``x_T = mu_k + S_k * z`` and run the core's DDPM or DDIM sampler with ``shift=Shift("prior", mu_k, S_k)`` over a
respaced plan (the demo's ``"8"``: t in {999, 856, ..., 143, 0}, the network sees original timesteps). The prior
predicts x0; classifier-free guidance combines ``[uncond; cond]`` from one batched forward, where the unconditional
branch zeroes the text states but keeps the CLIP text embedding and the component (METHOD.md, "Classifier-free guidance").

Released-code behaviours kept behind flags for comparison (METHOD.md, "Defaults"): ``guide_half`` (the GLIDE helper guides only
the first half of the embedding dimensions), ``prior_noise="zero"`` (x_T = mu, no noise), ``posterior_component=
"pred_x0"`` (posterior mean shifted by the component nearest to x0_hat), ``clip_denoised`` (clamp x0_hat to
``mu +- 3 sigma``). The defaults are the consistent process: every dimension guided, the data std, the text-chosen
component everywhere, no clamp.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

import torch

from common.denoisers import CFGDenoiser, FunctionDenoiser
from common.errors import UserError
from common.latents import decode_latents, vae_scale_factor
from common.process import Shift
from common.samplers import Callback, Generator, randn, sample
from common.schedule import NoiseSchedule, make_plan
from shifted.bank import GaussianBank, check_clip_models
from shifted.checkpoint import DECODER_FILE, PROJECTION_FOLDER, PathLike
from shifted.embeddings import PriorTextEncoder, check_texts
from shifted.prior import ShiftedPrior
from shifted.process import sampling_shift


SAMPLERS = ("ddpm", "ddim")
BANK_FILE = "bank.safetensors"


# ------------------------------------------------------------------------------------------------ consistency


def check_prior_bank(prior: ShiftedPrior, bank: Optional[GaussianBank]) -> None:
    """The prior and the bank must belong together: both with or both without a bank, one CLIP space."""
    cfg = prior.config
    if cfg.use_bank_token and bank is None:
        raise UserError("this prior was trained with a Gaussian bank: pass its bank (saved next to the prior)")
    if not cfg.use_bank_token and bank is not None:
        raise UserError("this prior is the no-bank baseline (plain DDPM): sample it without a Gaussian bank")
    if bank is not None:
        bank.check_embedding_dim(cfg.emb_dim, f"the prior (CLIP models {list(cfg.clip_models)})")
        bank.check_clip_models(cfg.clip_models, "the prior")


def check_text_encoder(prior: ShiftedPrior, encoder: PriorTextEncoder) -> None:
    """The caption encoders must be the ones the prior was trained on (CLIP models and text-state encoder)."""
    cfg = prior.config
    check_clip_models(cfg.clip_models, encoder.clip.names, "the prior")
    if encoder.text_states.name != cfg.text_encoder:
        raise UserError(
            f"the prior was trained on {cfg.text_encoder} text states but {encoder.text_states.name} was given: a "
            "prior does not transfer between text encoders (issue #3); pass the matching text encoder"
        )


# ----------------------------------------------------------------------------------------------------- sampling


def sample_shifted(
    denoiser,
    schedule: NoiseSchedule,
    bank: Optional[GaussianBank],
    bank_index: Optional[torch.Tensor],
    batch_size: int,
    dim: int,
    *,
    steps: Union[int, str] = "8",
    sampler: str = "ddpm",
    eta: float = 0.0,
    variance_type: str = "fixed_large",
    prior_noise: str = "data_std",
    posterior_component: str = "text",
    generator: Generator = None,
    callback: Optional[Callback] = None,
    device=None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> torch.Tensor:
    """The shifted reverse process for any x0-denoiser ``(x_t [B, D], t [B]) -> x0_hat [B, D]`` -> ``x_0 [B, D]``.

    DDPM (``variance_type="fixed_large"`` is the reference's beta_t) or DDIM with ``eta`` (METHOD.md),
    both the core samplers with the bank's shift; ``bank=None`` is plain DDPM / DDIM (the baseline prior).
    ``steps`` is a respacing string (``"8"``, ``"ddim50"``, ``"fast27"``; the network sees original timesteps) or an
    int (diffusers' leading spacing). ``x_T = mu + S z``, ``z`` the first draw from ``generator``.
    """
    if sampler not in SAMPLERS:
        raise UserError(f"unknown prior sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    plan = make_plan(schedule, steps)
    shape = (batch_size, dim)
    if bank is None and (prior_noise, posterior_component) != ("data_std", "text"):
        raise UserError("--prior_noise / --posterior_component choose bank statistics: they need a Gaussian bank")
    shift: Optional[Shift] = None
    x_T = randn(shape, generator, device, dtype)  # drawn first, as the core samplers draw their x_T
    if bank is not None:
        bank.check_embedding_dim(dim, "the sampled embedding")
        shift, mean = sampling_shift(
            bank, bank_index, prior_noise=prior_noise, posterior_component=posterior_component, dtype=dtype,
            device=x_T.device,
        )
        # x_T = mu + S z as the reference: the exact terminal mean sqrt(abar_T) E[x0] + (1 - sqrt(abar_T)) mu is mu
        # when the component's members average to mu, whereas the core's default start (S z + k_T mu) would
        # drop the sqrt(abar_T) E[x0] term (a 0.6 % pull towards the origin).
        x_T = mean + shift.scale * x_T
    kwargs = dict(x_T=x_T, generator=generator, shift=shift, callback=callback, dtype=dtype, progress=progress)
    return sample(sampler, denoiser, schedule, plan, eta=eta, variance_type=variance_type, **kwargs)


def prior_denoiser(
    prior: ShiftedPrior,
    clip_text: torch.Tensor,
    text_states: torch.Tensor,
    bank_index: Optional[torch.Tensor],
    guidance_scale: float = 1.0,
    guide_half: bool = False,
    clamp: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
):
    """The prior with classifier-free guidance as an x0 denoiser (METHOD.md, "Classifier-free guidance").

    ``x0_hat = u + w (c - u)`` with ``c`` the prediction from the text states and ``u`` from all-zero states (same
    CLIP text embedding, same component), one batched forward ``[uncond; cond]``. ``w = 0`` is unconditional,
    ``w = 1`` conditional (one forward). ``guide_half`` reproduces the released GLIDE helper, which treats the
    second half of the embedding as "variance channels": dims ``[:D/2]`` guided, ``[D/2:]`` conditional (the core
    CFG wrapper's learned-variance rule is exactly that). ``clamp=(low, high)`` clamps x0_hat (``clip_denoised``).
    """
    cond = {"clip_text": clip_text, "text_states": text_states}
    uncond = {"clip_text": clip_text, "text_states": torch.zeros_like(text_states)}
    if bank_index is not None:
        cond["bank_index"] = uncond["bank_index"] = bank_index
    if guide_half and prior.config.emb_dim % 2:
        raise UserError("--guide_half splits the embedding in two halves: it needs an even embedding width")
    cfg = CFGDenoiser(prior, cond, uncond, guidance_scale, "x0", learned_variance=guide_half)
    if not guide_half and clamp is None:
        return cfg

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = cfg(x, t)
        return out if clamp is None else torch.maximum(torch.minimum(out, clamp[1]), clamp[0])

    return FunctionDenoiser(guided, "x0")


@torch.no_grad()
def sample_prior(
    prior: ShiftedPrior,
    bank: Optional[GaussianBank],
    clip_text: torch.Tensor,
    text_states: torch.Tensor,
    *,
    steps: Union[int, str] = "8",
    sampler: str = "ddpm",
    eta: float = 0.0,
    guidance_scale: float = 1.0,
    guide_half: bool = False,
    prior_noise: str = "data_std",
    posterior_component: str = "text",
    clip_denoised: bool = False,
    select_mode: str = "mean",
    variance_type: str = "fixed_large",
    generator: Generator = None,
    callback: Optional[Callback] = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> torch.Tensor:
    """CLIP image embeddings ``[B, D]`` for CLIP text embeddings ``[B, D]`` and text states ``[B, L, d]``.

    Defaults = the reference demo's schedule (8 respaced DDPM steps, fixed-large variance, guidance 1) on the
    consistent process; ``--guide_half``, ``--prior_noise zero``, ``--posterior_component pred_x0`` and
    ``--clip_denoised`` switch on the released sampler's behaviours one by one.
    """
    check_prior_bank(prior, bank)
    device = next(prior.parameters()).device
    clip_text, text_states = clip_text.to(device), text_states.to(device)
    bank_index, clamp = None, None
    if bank is not None:
        bank_index = bank.select(clip_text, mode=select_mode).to(device)
        if clip_denoised:  # the reference clamps to mu +- 3 sigma (sigma, not the terminal S = s sigma)
            mean, std = bank.mean[bank_index].to(device), bank.std[bank_index].to(device)
            clamp = (mean - 3 * std, mean + 3 * std)
    elif clip_denoised:
        raise UserError("--clip_denoised clamps to the bank's mu +- 3 sigma: it needs a prior with a Gaussian bank")
    denoiser = prior_denoiser(prior, clip_text, text_states, bank_index, guidance_scale, guide_half, clamp)
    return sample_shifted(
        denoiser, prior.noise_schedule(), bank, bank_index, clip_text.shape[0], prior.config.emb_dim,
        steps=steps, sampler=sampler, eta=eta, variance_type=variance_type, prior_noise=prior_noise,
        posterior_component=posterior_component, generator=generator, callback=callback, device=device,
        dtype=dtype, progress=progress,
    )


def sample_prior_from_texts(
    prior: ShiftedPrior,
    bank: Optional[GaussianBank],
    encoder: PriorTextEncoder,
    texts: Sequence[str],
    **kwargs,
) -> torch.Tensor:
    """:func:`sample_prior` from captions: checks the encoders match the prior, rejects empty captions."""
    texts = check_texts(texts)
    check_text_encoder(prior, encoder)
    clip_text, text_states = encoder(texts)
    return sample_prior(prior, bank, clip_text, text_states, **kwargs)


def null_image_embedding(
    prior: ShiftedPrior, bank: Optional[GaussianBank], encoder: PriorTextEncoder, **kwargs
) -> torch.Tensor:
    """``prior("")`` ``[D]``: the reference's CFG null / negative embedding for the SD decoder."""
    check_text_encoder(prior, encoder)
    clip_text, text_states = encoder([""], allow_empty=True)
    return sample_prior(prior, bank, clip_text, text_states, **kwargs)[0]


def save_prior(folder: Union[str, Path], prior: ShiftedPrior, bank: Optional[GaussianBank],
               beside_existing: bool = False) -> Path:
    """Write ``config.json`` + ``diffusion_pytorch_model.safetensors`` (prior) + ``bank.safetensors``, atomically
    (``beside_existing``: into a training run's output folder, next to its checkpoints and logs)."""
    from common.io import save_model_folder

    check_prior_bank(prior, bank)

    def write(tmp: Path) -> None:
        prior.save_pretrained(tmp, safe_serialization=True)
        if bank is not None:
            bank.save(Path(tmp) / BANK_FILE)

    return save_model_folder(folder, write, beside_existing=beside_existing)


def prior_entries(folder: Union[str, Path]) -> list[str]:
    """The files of a prior folder that make up the prior (a training run's output folder also holds its
    checkpoints and logs, which a release does not copy)."""
    folder = Path(folder)
    return [name for name in ("config.json", "diffusion_pytorch_model.safetensors", BANK_FILE)
            if (folder / name).is_file()]


def _legacy_prior_overrides(folder: Path) -> dict:
    """Config values a prior folder saved before they existed implies, checked against its weights.

    Priors saved before ``attn_out_bias`` existed all had biased attention outputs: their config lacks the key and
    their weights hold ``blocks.N.attn.to_out.bias``; they load as they were saved. Any other difference between
    the weights and the network the config builds is an error naming the key (diffusers would only warn and leave
    a random tensor, or drop a trained one).
    """
    import json

    from safetensors import safe_open

    weights = folder / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise UserError(f"{folder} has no diffusion_pytorch_model.safetensors: pass the folder written by save_prior")
    config = json.loads((folder / "config.json").read_text())
    with safe_open(str(weights), framework="pt") as handle:
        keys = set(handle.keys())
    overrides = {}
    if "attn_out_bias" not in config:
        overrides["attn_out_bias"] = "blocks.0.attn.to_out.bias" in keys
    with torch.device("meta"):
        expected = set(ShiftedPrior.from_config({**config, **overrides}).state_dict())
    for what, names in (("lacks", expected - keys), ("has an unexpected", keys - expected)):
        if names:
            raise UserError(f"the prior weights in {folder} {what} tensor {sorted(names)[0]} "
                            f"({len(names)} in all): its config.json does not describe them; re-save the prior")
    return overrides


def load_prior(
    folder: Union[str, Path],
    clip_models: Optional[Sequence[str]] = None,
    text_encoder: Optional[str] = None,
    device: Union[str, torch.device] = "cpu",
) -> tuple[ShiftedPrior, Optional[GaussianBank]]:
    """Load a :func:`save_prior` folder; with ``clip_models`` / ``text_encoder``, check the prior matches them."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} is not a prior folder (no config.json): pass the folder written by save_prior")
    prior = ShiftedPrior.from_pretrained(str(folder), **_legacy_prior_overrides(folder)).to(device).eval()
    bank = GaussianBank.load(folder / BANK_FILE).to(device) if (folder / BANK_FILE).is_file() else None
    check_prior_bank(prior, bank)
    if clip_models is not None:
        check_clip_models(prior.config.clip_models, clip_models, f"the prior {folder}")
    if text_encoder is not None and text_encoder != prior.config.text_encoder:
        raise UserError(
            f"the prior {folder} was trained on {prior.config.text_encoder} text states, not {text_encoder}: pass "
            "the matching --t5_model"
        )
    return prior, bank


# ---------------------------------------------------------------------------------------------- the decoder


class ImageDecoder:
    """SD UNet + VAE + :class:`~shifted.projection.ImageEmbProjection` + scheduler: image embedding -> image."""

    def __init__(self, unet, vae, projection, scheduler_config: dict, clip_models: Sequence[str] = ()):
        from common.process import canonical_prediction_type
        from common.schedule import NoiseSchedule

        self.unet, self.vae, self.projection = unet, vae, projection
        self.scheduler_config = dict(scheduler_config)
        self.schedule = NoiseSchedule.from_config(self.scheduler_config)
        self.prediction_type = canonical_prediction_type(self.scheduler_config.get("prediction_type", "epsilon"))
        self.clip_models = tuple(clip_models)
        self.vae_scale_factor = vae_scale_factor(vae)

    @classmethod
    def from_pretrained(cls, folder: PathLike, device: Union[str, torch.device] = "cpu") -> ImageDecoder:
        from common.models import load_unet, load_vae
        from common.pipeline import read_scheduler_config
        from shifted.projection import ImageEmbProjection

        folder = Path(folder)
        if not folder.is_dir():
            raise UserError(f"decoder folder {folder} does not exist: pass the pipeline folder finetune.py wrote")
        if not (folder / PROJECTION_FOLDER / "config.json").is_file() or not (folder / DECODER_FILE).is_file():
            raise UserError(
                f"{folder} is not an image-embedding decoder (no {PROJECTION_FOLDER}/ or {DECODER_FILE}): pass the "
                "pipeline folder written by scripts/shifted/finetune.py"
            )
        meta = json.loads((folder / DECODER_FILE).read_text())
        scheduler_config = read_scheduler_config(str(folder))
        unet = load_unet(folder, subfolder="unet").float().to(device).eval()
        vae = load_vae(folder, subfolder="vae").float().to(device).eval()
        projection = ImageEmbProjection.from_pretrained(str(folder / PROJECTION_FOLDER)).float().to(device).eval()
        return cls(unet, vae, projection, scheduler_config, meta.get("clip_models", ()))

    def check_clip_models(self, names: Sequence[str], what: str) -> None:
        from shifted.bank import check_clip_models

        check_clip_models(self.clip_models, names, f"the decoder (for {what})")

    def memory_plan(self, batch: int, resolution: Optional[int] = None, guidance_scale: float = 2.0,
                    max_memory_gb: Optional[float] = None, extra_models: Sequence = ()):
        """The fastest way (``common.memory.plan``: VAE slicing / tiling, attention chunks, UNet micro-batches) to
        decode ``batch`` embeddings at ``resolution`` px within ``max_memory_gb`` (default: the machine's memory);
        a one-line UserError naming the estimate, the budget and the fix when none fits. ``extra_models`` (the
        prior, the caption encoders) count in the weights."""
        from common import memory

        size = resolution or self.unet.config.sample_size * self.vae_scale_factor
        if size % self.vae_scale_factor:
            raise UserError(f"resolution {size} is not divisible by the VAE's factor {self.vae_scale_factor}")
        param = next(self.unet.parameters())
        request = memory.Request(batch, size, size, guided=guidance_scale != 1.0,
                                 dtype_bytes=torch.finfo(param.dtype).bits // 8, device=str(param.device))
        return memory.plan(self.unet, self.vae, request, memory.budget_bytes(max_memory_gb, str(param.device)),
                           extra_models=(self.projection, *extra_models))

    @torch.no_grad()
    def __call__(
        self,
        image_emb: torch.Tensor,
        *,
        num_inference_steps: int = 50,
        guidance_scale: float = 2.0,
        negative_emb: Optional[torch.Tensor] = None,
        sampler: str = "ddim",
        eta: float = 0.0,
        resolution: Optional[int] = None,
        generator=None,
        progress: bool = False,
        max_memory_gb: Optional[float] = None,
        record: Optional[dict] = None,
    ) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] for embeddings ``[B, D]``; the negative defaults to the stored null.

        ``max_memory_gb``: the budget (default: the machine's memory) the VAE mode, attention chunking and UNet
        micro-batching are chosen to fit (:meth:`memory_plan`), or the request is refused before x_T exists;
        ``record``, when given, receives the plan taken (``record["memory_plan"]``)."""
        from common.samplers import sample
        from common.schedule import plan_like_diffusers
        from shifted.projection import image_embedding_denoiser

        if sampler not in ("ddim", "ddpm"):
            raise UserError(f"unknown sampler {sampler!r}: choose ddim or ddpm")
        device = next(self.unet.parameters()).device
        image_emb = image_emb.to(device=device, dtype=torch.float32)
        if negative_emb is not None:
            negative_emb = negative_emb.to(device=device, dtype=torch.float32)
        size = resolution or self.unet.config.sample_size * self.vae_scale_factor
        if size % self.vae_scale_factor:
            raise UserError(f"resolution {size} is not divisible by the VAE's factor {self.vae_scale_factor}")
        shape = (image_emb.shape[0], self.unet.config.in_channels, size // self.vae_scale_factor,
                 size // self.vae_scale_factor)
        memory_plan = self.memory_plan(image_emb.shape[0], size, guidance_scale, max_memory_gb)
        if record is not None:
            record["memory_plan"] = memory_plan.describe()
        denoiser = image_embedding_denoiser(self.unet, self.projection, image_emb, guidance_scale, negative_emb,
                                            self.prediction_type)
        plan = plan_like_diffusers(self.schedule, self.scheduler_config, num_inference_steps, sampler)
        common = dict(generator=generator, device=device, dtype=torch.float32, progress=progress)
        with memory_plan.applied(self.unet):
            latents = sample(sampler, denoiser, self.schedule, plan, shape, eta=eta,
                             variance_type=self.scheduler_config.get("variance_type", "fixed_small"), **common)
        with memory_plan.applied(self.vae, split=False):
            return decode_latents(self.vae, latents, mode=memory_plan.vae)
