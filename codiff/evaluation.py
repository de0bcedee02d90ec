"""The paper's claim measured in the digits world: does a collaboration follow BOTH conditions?

Each evaluation prompt (``common.digits.evaluation_prompts``: every (digit, colour) pair) is paired with a mask of
the test split showing the SAME digit, so the two conditions agree. Every variant samples from the same initial
noise and is scored on:

- **stroke IoU** with the conditioning mask: the generated image parsed into background / stroke
  (``common.metrics.parse_stroke_mask`` with the dataset's own mask threshold, 0.35 of full brightness) and
  compared with the mask (``common.metrics.mask_agreement``; IoU of the stroke class, pooled over the set), plus
  the mean IoU over both classes;
- the **judge** (``common.judge``): the digit and the colour the text asks for.

Variants (``codiff.variants``): ``collaborative`` (learned influence maps, optionally with the released
re-weighting), ``average`` (fixed equal weights, the Composable-Diffusion baseline), ``mask_only`` and
``text_only`` (one member alone). References: the real test images (the ceiling) and "another test mask of the same
digit" (the IoU a model reaches by drawing the right digit without following this particular mask).

Editing (:func:`evaluate_editing`): test images re-coloured by text (the same digit, another colour) with their
own mask as the mask target; an edit should reach the new colour and keep the layout (stroke IoU with the input's
mask).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

from common.errors import UserError


IOU_THRESHOLD = 0.35  # common.digits.MASK_THRESHOLD: how the dataset's masks were cut from stroke intensity


@dataclass
class TestMask:
    file: Optional[Path]  # None for masks computed in memory
    ids: torch.Tensor  # [H, W] long
    digit: int
    index: int  # row of the test metadata


def test_split(data_root: Path) -> Path:
    """``<data_root>/test`` of a digits build, built first (3 s) when ``data_root`` is the default and missing."""
    from common.digits import build_digits

    data_root = Path(data_root)
    if not (data_root / "test" / "metadata.jsonl").is_file():
        build_digits(data_root)
    return data_root / "test"


def load_test_masks(data_root: Path) -> list[TestMask]:
    from common.data import load_mask_ids

    folder = test_split(data_root)
    out = []
    for index, line in enumerate((folder / "metadata.jsonl").read_text().splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        if not row.get("mask_file_name"):
            raise UserError(f"{folder}/metadata.jsonl has no mask_file_name column: rebuild the digits world")
        path = folder / row["mask_file_name"]
        out.append(TestMask(path, torch.from_numpy(load_mask_ids(path, 2)), int(row["digit"]), index))
    return out


def paired_masks(digits: Sequence[Optional[int]], data_root: Optional[Path], offset: int = 0,
                 masks: Optional[Sequence[TestMask]] = None) -> list[TestMask]:
    """One test mask per target digit: the k-th test mask of that digit for its k-th occurrence (``offset`` shifts
    the choice: ``offset=1`` gives *another* mask of the same digit). ``None``: any test mask, in turn. ``masks``:
    the test masks to choose from instead of ``data_root``'s."""
    masks = list(masks) if masks is not None else load_test_masks(data_root)
    by_digit: dict[int, list[TestMask]] = {}
    for m in masks:
        by_digit.setdefault(m.digit, []).append(m)
    seen: dict[Optional[int], int] = {}
    out = []
    for digit in digits:
        k = seen.get(digit, 0)
        seen[digit] = k + 1
        pool = by_digit.get(digit) if digit is not None else masks
        if not pool:
            raise UserError(f"the test split has no mask of digit {digit}")
        out.append(pool[(k + offset) % len(pool)])
    return out


def to_pil_list(images: torch.Tensor) -> list[Image.Image]:
    from common.io import to_pil

    return [to_pil(img, value_range=(0.0, 1.0)) for img in images]


def mask_scores(images: Sequence[Image.Image], masks: Sequence[torch.Tensor]) -> dict[str, float]:
    """``stroke_iou`` (IoU of the stroke class, pooled) and ``mask_miou`` of parsed images against masks."""
    from common.metrics import parsed_mask_agreement, stroke_parser

    result = parsed_mask_agreement(list(images), [np.asarray(m) for m in masks], 2, stroke_parser(IOU_THRESHOLD))
    return {"stroke_iou": result["per_class_iou"][1], "mask_miou": result["mean_iou"],
            "mask_pixel_accuracy": result["pixel_accuracy"]}


def score_images(images: Sequence[Image.Image], prompts: Sequence[dict], masks: Sequence[torch.Tensor]) -> dict:
    from common.judge import judge_images

    judged = judge_images(list(images), [(p.get("digit"), p.get("color")) for p in prompts])
    scores = {k: judged[k] for k in ("digit_accuracy", "color_accuracy", "both_accuracy", "count",
                                      "judge_heldout_digit_accuracy")}
    scores.update(mask_scores(images, masks))
    return scores


@dataclass
class SamplingSettings:
    steps: int = 50
    eta: float = 1.0
    guidance_scale: float = 1.0
    sampler: str = "ddim"
    released_reweighting: bool = False

    def describe(self) -> str:
        cfg = "no CFG" if self.guidance_scale == 1.0 else f"CFG {self.guidance_scale:g} per member"
        rw = ", released re-weighting" if self.released_reweighting else ""
        return f"{self.sampler.upper()} {self.steps} steps, eta {self.eta:g}, {cfg}{rw}"


def generate_variant(
    collab,
    texts: Sequence[str],
    masks: Sequence[torch.Tensor],
    variant: str,
    settings: SamplingSettings,
    *,
    seed: int = 0,
    batch_size: int = 60,
    progress: bool = False,
) -> torch.Tensor:
    """Images ``[N, 3, H, W]`` in [0, 1] of one variant for paired (text, mask) conditions. The initial noise of
    sample i depends on ``(seed, i)`` only, so every variant starts from the same ``x_T``."""
    from codiff.collaborate import ReleasedReweighting
    from codiff.variants import variant_weights

    if len(texts) != len(masks):
        raise UserError(f"{len(texts)} prompts but {len(masks)} masks: pair them one to one")
    kinds = {n: m.kind for n, m in collab.members.items()}
    weights = variant_weights(variant, collab.modalities, kinds)
    mask_name, text_name = collab.modality_of_kind("mask"), collab.modality_of_kind("text")
    pipe = collab.pipeline()
    reweighting = None
    if settings.released_reweighting and weights is None:
        reweighting = ReleasedReweighting.released(tuple(n for n, k in kinds.items() if k == "mask"))
    g = torch.Generator().manual_seed(seed)
    x_T_all = torch.randn((len(texts), *pipe.latent_shape), generator=g)
    out = []
    for start in range(0, len(texts), batch_size):
        stop = min(start + batch_size, len(texts))
        conds: dict[str, Any] = {}
        if mask_name:
            conds[mask_name] = torch.stack([torch.as_tensor(m) for m in masks[start:stop]])
        if text_name:
            conds[text_name] = list(texts[start:stop])
        uncond = scales = None
        if settings.guidance_scale != 1.0:
            uncond = collab.null_conditions(1)
            scales = {n: settings.guidance_scale for n in collab.modalities}
        gen = pipe(conds, batch_size=stop - start, num_inference_steps=settings.steps, eta=settings.eta,
                   sampler=settings.sampler, generator=torch.Generator().manual_seed(seed + 1 + start),
                   x_T=x_T_all[start:stop].to(pipe.device), reweighting=reweighting, uncond=uncond,
                   guidance_scales=scales, weights=weights, progress=progress)
        out.append(gen.images.cpu())
    return torch.cat(out)


def reference_scores(prompts: Sequence[dict], masks: Sequence[TestMask], data_root: Path) -> dict[str, dict]:
    """The real test images of the paired masks (judged against their own digit/colour: the ceiling) and the IoU of
    another mask of the same digit (what drawing the right digit without following the mask gives)."""
    from common.io import load_image_rgb

    folder = test_split(data_root)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]
    real = [load_image_rgb(folder / rows[m.index]["file_name"]) for m in masks]
    real_targets = [{"digit": rows[m.index]["digit"], "color": rows[m.index]["color"]} for m in masks]
    others = paired_masks([p.get("digit") for p in prompts], data_root, offset=1)
    other_images = [Image.fromarray((o.ids.numpy() * 255).astype(np.uint8)).convert("RGB") for o in others]
    return {
        "real test images (their own captions)": score_images(real, real_targets, [m.ids for m in masks]),
        "another test mask of the same digit": mask_scores(other_images, [m.ids for m in masks]),
    }


def evaluate_claim(
    collab,
    n: int = 60,
    *,
    data_root: Path = Path("data/digits"),
    settings: Optional[SamplingSettings] = None,
    variants: Sequence[str] = ("mask_only", "text_only", "average", "collaborative"),
    seed: int = 0,
    save_dir: Optional[Path] = None,
    progress: bool = False,
) -> dict[str, dict]:
    """Scores of every variant on ``n`` prompt/mask pairs (module docstring), keyed by variant."""
    from common.digits import evaluation_prompts

    settings = settings or SamplingSettings()
    prompts = evaluation_prompts(n)
    masks = paired_masks([p["digit"] for p in prompts], data_root)
    results = {}
    for variant in variants:
        start = time.perf_counter()
        images = generate_variant(collab, [p["text"] for p in prompts], [m.ids for m in masks], variant, settings,
                                  seed=seed, progress=progress)
        pil = to_pil_list(images)
        scores = score_images(pil, prompts, [m.ids for m in masks])
        scores["seconds"] = round(time.perf_counter() - start, 2)
        results[variant] = scores
        if save_dir is not None:
            from common.io import save_image_grid

            save_dir.mkdir(parents=True, exist_ok=True)
            save_image_grid(images, save_dir / f"{variant}.png", nrow=10, value_range=(0, 1))
    return results


# --------------------------------------------------------------------------------------------------- editing


def edit_targets(count: int, data_root: Path) -> list[dict]:
    """The first ``count`` test images, each with a new colour (the next one in ``COLORS``) for the same digit."""
    from common.digits import COLORS, caption

    folder = test_split(data_root)
    names = list(COLORS)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]
    out = []
    for row in rows[:count]:
        new = names[(names.index(row["color"]) + 1 + len(out) % (len(names) - 1)) % len(names)]
        out.append({"image": folder / row["file_name"], "mask": folder / row["mask_file_name"],
                    "digit": int(row["digit"]), "color": new, "source_color": row["color"],
                    "text": caption(int(row["digit"]), new)})
    return out


def evaluate_editing(
    collab,
    count: int = 12,
    *,
    data_root: Path = Path("data/digits"),
    stage1_steps: int = 100,
    stage1_lr: float = 1e-3,
    stage2_steps: int = 100,
    stage2_lr: float = 1e-5,
    alphas: Sequence[float] = (0.0, 1.0, 1.5, 2.0, 3.0),
    settings: Optional[SamplingSettings] = None,
    guidance_scales: Sequence[float] = (1.0,),
    seed: int = 0,
    save_dir: Optional[Path] = None,
) -> dict[str, dict]:
    """Colour edits by text with the input's own mask: scores per (guidance, ``collaborative`` / ``text_only`` /
    ``mask_only``, alpha): colour accuracy against the NEW colour, digit accuracy, stroke IoU with the input's mask.
    The Imagic stages run once per image and serve every guidance scale. Also the unedited inputs as a reference
    (IoU ceiling; colour accuracy 0 by construction)."""
    from codiff.conditions import load_mask
    from codiff.edit import imagic_members, sample_edits
    from common.io import load_image_rgb

    settings = settings or SamplingSettings()
    targets = edit_targets(count, data_root)
    mask_name, text_name = collab.modality_of_kind("mask"), collab.modality_of_kind("text")
    if mask_name is None or text_name is None:
        raise UserError("the editing evaluation needs a mask member and a text member")
    by_key: dict[str, list] = {}
    inputs, input_masks = [], []
    for k, target in enumerate(targets):
        pil = load_image_rgb(target["image"])
        inputs.append(pil)
        ids = load_mask(target["mask"], collab.mask_format)
        input_masks.append(ids)
        image = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
        edits, latent = imagic_members(collab, image, {mask_name: ids, text_name: target["text"]},
                                       stage1_steps=stage1_steps, stage1_lr=stage1_lr, stage2_steps=stage2_steps,
                                       stage2_lr=stage2_lr, seed=seed + k)
        for g in guidance_scales:
            cfg = "no CFG" if g == 1.0 else f"CFG {g:g}"
            out = sample_edits(collab, edits, latent, alphas=tuple(alphas), num_inference_steps=settings.steps,
                               eta=settings.eta, sample_seed=seed + 1000 + k, guidance_scale=g, unimodal=True)
            for alpha, images in out.collaborative.items():
                by_key.setdefault(f"collaborative, {cfg}, alpha={alpha:g}", []).append(images[0])
            for name, per_alpha in out.unimodal.items():
                kind = collab.members[name].kind
                for alpha, images in per_alpha.items():
                    by_key.setdefault(f"{kind}_only, {cfg}, alpha={alpha:g}", []).append(images[0])
    prompts = [{"digit": t["digit"], "color": t["color"]} for t in targets]
    results = {"unedited input": score_images(inputs, prompts, input_masks)}
    for key, images in sorted(by_key.items()):
        results[key] = score_images(to_pil_list(torch.stack(images)), prompts, input_masks)
        if save_dir is not None:
            from common.io import save_image_grid

            save_dir.mkdir(parents=True, exist_ok=True)
            name = key.replace(", ", "_").replace(" ", "")
            save_image_grid(torch.stack(images), save_dir / f"edit_{name}.png", nrow=12, value_range=(0, 1))
    return results


# ------------------------------------------------------------------------------------- the training objective


@torch.no_grad()
def denoising_losses(
    collab,
    data_root: Path = Path("data/digits"),
    *,
    count: int = 297,
    timesteps: Sequence[int] = (100, 300, 500, 700, 900),
    variants: Sequence[str] = ("mask_only", "text_only", "average", "collaborative"),
    seed: int = 0,
    batch_size: int = 99,
) -> dict[str, dict[str, float]]:
    """Held-out eps-MSE (the objective the dynamic diffusers minimise, METHOD.md) of every variant on the test split:
    the same latents (posterior means), timesteps and noise for all; per timestep and the mean over them."""
    from codiff.variants import variant_weights
    from common.data import image_text_dataset

    folder = test_split(data_root)
    dataset = image_text_dataset(folder, resolution=collab.image_size, num_mask_classes=2)
    count = min(count, len(dataset))
    kinds = {n: m.kind for n, m in collab.members.items()}
    mask_name, text_name = collab.modality_of_kind("mask"), collab.modality_of_kind("text")
    device = next(collab.vae.parameters()).device
    schedule = collab.schedule
    g = torch.Generator().manual_seed(seed)
    sums = {v: {int(t): 0.0 for t in timesteps} for v in variants}
    for start in range(0, count, batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, count))]
        pixels = torch.stack([it["pixel_values"] for it in items]).to(device)
        latents = collab.vae.encode(pixels).latent_dist.mean * float(collab.vae.config.scaling_factor)
        conds = {}
        if mask_name:
            conds[mask_name] = collab.members[mask_name].encode(torch.stack([it["mask"] for it in items]))
        if text_name:
            conds[text_name] = collab.members[text_name].encode([it["text"] for it in items])
        for t in timesteps:
            tt = torch.full((len(items),), int(t), dtype=torch.long, device=device)
            noise = torch.randn(latents.shape, generator=g).to(device)
            abar = schedule.abar(tt, like=latents)
            x_t = abar.sqrt() * latents + (1 - abar).sqrt() * noise
            for variant in variants:
                weights = variant_weights(variant, collab.modalities, kinds)
                if weights is None:
                    eps = collab.model.predict(x_t, tt, conds).eps
                else:
                    names = [n for n, w in weights.items() if w > 0]
                    member = collab.model.member_eps(x_t, tt, conds, names=names)
                    eps = sum(weights[n] * e for n, e in zip(names, member))
                sums[variant][int(t)] += float(((eps - noise) ** 2).mean(dim=(1, 2, 3)).sum())
    out = {}
    for variant, per_t in sums.items():
        scores = {f"t={t}": v / count for t, v in per_t.items()}
        scores["mean"] = sum(scores.values()) / len(scores)
        out[variant] = scores
    return out


def influence_profile(
    collab, n: int = 24, data_root: Path = Path("data/digits"), *, steps: int = 50, seed: int = 0, bins: int = 5
) -> dict[str, Any]:
    """Where the learned influence goes: the text member's mean influence over ``bins`` equal stretches of a
    ``steps``-step DDIM trajectory (first = noisiest), and on stroke vs background latent pixels, for ``n``
    evaluation prompts with paired test masks. Explains *when* each modality drives the sample."""
    import torch.nn.functional as F

    from common.digits import evaluation_prompts

    text, mask = collab.modality_of_kind("text"), collab.modality_of_kind("mask")
    if text is None or mask is None:
        raise UserError("the influence profile needs a text and a mask member")
    prompts = evaluation_prompts(n)
    ids = torch.stack([m.ids for m in paired_masks([p["digit"] for p in prompts], data_root)])
    gen = collab.pipeline()({mask: ids, text: [p["text"] for p in prompts]}, batch_size=n,
                            num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), record=True,
                            progress=False)
    text_maps = gen.influence[:, :, collab.modalities.index(text)]  # [S, B, h, w]
    per_step = text_maps.mean(dim=(1, 2, 3))
    stroke = F.adaptive_avg_pool2d(ids.float()[:, None], text_maps.shape[-2:])[:, 0] > 0.25
    return {
        "text_influence_by_stretch": [float(chunk.mean()) for chunk in per_step.chunk(bins)],
        "text_influence_mean": float(per_step.mean()),
        "text_influence_stroke": float(text_maps[:, stroke].mean()),
        "text_influence_background": float(text_maps[:, ~stroke].mean()),
    }
