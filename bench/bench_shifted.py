"""Shifted Diffusion on the digits world: the paper's two claims, and what the prior costs next to the image model.

    python bench/bench_shifted.py                  # everything (about 10 minutes on 2 busy cores)
    python bench/bench_shifted.py --part cost      # timings and memory only

Claim 1 (prior quality, the paper's main claim): on the 297 held-out captions, the shifted prior's embeddings (8 respaced DDPM
steps) against the unshifted prior of equal size and budget (both shipped in ckpt/tiny/shifted): Fréchet distance
to the held-out real image embeddings (lower is better) and mean cosine to the paired image embedding (higher is
better), averaged over sampling seeds; also at 25 steps.
Claim 2 (language-free training): the decoder fine-tuned on images only, driven by text through the prior, judged
on ``evaluation_prompts(60)`` x seeds, next to the text-conditioned baseline (ckpt/tiny/baseline) run here on the
same prompts and seeds, the same decoder driven by the unshifted prior, and its ceiling (the real embeddings of
held-out images decoded, judged against their labels).
Cost: prior sampling (8 steps) vs the decoder's sampling (25 DDIM steps, CFG) for the same 60 prompts, interleaved
repetitions, medians; peak RSS.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch


REPO = Path(__file__).resolve().parent.parent

SECTION = "shifted diffusion"
COMMAND = "OMP_NUM_THREADS=1 python bench/bench_shifted.py"


def rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def vm_hwm_mb() -> float:
    """Peak resident memory of this process from /proc (VmHWM): unlike ru_maxrss it is not inherited through
    fork + exec, so a subprocess reports only its own peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return rss_mb()


def load_all(checkpoint: Path):
    from shifted.system import load_system

    shifted = load_system(checkpoint, prior_variant="shifted")
    baseline_prior = load_system(checkpoint, prior_variant="baseline", need_decoder=False)
    return shifted, baseline_prior


def held_out(system, data: Path):
    from shifted.data import embed_folder

    test, _, extras = embed_folder(system.clip, data / "test", text_states=system.encoder.text_states)
    train, _, train_extras = embed_folder(system.clip, data / "train", with_text=False)
    return test, extras, train["image_emb"], train_extras


def label_references(test, extras, train_image, train_extras, block_dims, seeds) -> dict:
    """Two ways to answer a caption from real data: the class mean (a perfect regressor) and a random training
    image of the same (digit, colour) (a perfect sampler), scored like the priors."""
    import collections

    import numpy as np

    from shifted.evaluation import embedding_metrics

    groups = collections.defaultdict(list)
    for i, e in enumerate(train_extras):
        groups[(e["digit"], e["color"])].append(i)
    keys = [(e["digit"], e["color"]) for e in extras]
    means = {k: train_image[v].mean(0) for k, v in groups.items()}
    out = {"class mean of the training image embeddings": embedding_metrics(
        torch.stack([means[k] for k in keys]), test["image_emb"], block_dims)}
    runs = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        pick = torch.stack([train_image[groups[k][int(torch.randint(len(groups[k]), (1,), generator=g))]]
                            for k in keys])
        runs.append(embedding_metrics(pick, test["image_emb"], block_dims))
    out["a random training image of the same digit and colour"] = {
        k: float(np.mean([r[k] for r in runs])) for k in ("frechet", "cosine")}
    return out


@torch.no_grad()
def diversity_rows(systems: dict, test, extras, steps: str = "8") -> list[dict]:
    """How much a prior's samples vary for one caption (two seeds), next to the real variation within a class."""
    import collections

    from shifted.pipeline import sample_prior

    groups = collections.defaultdict(list)
    for i, e in enumerate(extras):
        groups[(e["digit"], e["color"])].append(i)
    real = torch.stack([test["image_emb"][v].var(0).mean() for v in groups.values() if len(v) > 1]).mean()
    rows = [dict(name="prior diversity: reference, per-dimension variance of held-out image embeddings within one "
                      "(digit, colour)", value=round(float(real), 4), unit="var")]
    for label, system in systems.items():
        a, b = (sample_prior(system.prior, system.bank, test["text_emb"], test["text_states"], steps=steps,
                             generator=torch.Generator().manual_seed(seed)).cpu() for seed in (0, 1))
        rows.append(dict(name=f"prior diversity: {label} prior, {steps} steps, per-dimension variance between two "
                              "samples for the same caption", value=round(float(((a - b) ** 2).mean() / 2), 4),
                         unit="var"))
    return rows


def claim_prior(systems: dict, test, extras, train_image, train_extras, seeds, steps_list=("8", "25")) -> list[dict]:
    """``systems``: label -> a loaded system (its prior + bank); "shifted" and "unshifted" are compared."""
    import numpy as np

    from shifted.evaluation import evaluate_prior, reference_metrics

    block_dims = systems["shifted"].prior.config.clip_dims
    ref = reference_metrics(test, block_dims, train_image)
    rows = [
        dict(name="prior claim: reference, real training vs held-out image embeddings, Fréchet distance (floor)",
             value=round(ref["train_vs_test_frechet"], 4), unit="FD"),
        dict(name="prior claim: reference, the caption's CLIP text embedding as the image embedding, Fréchet distance",
             value=round(ref["text_as_image"]["frechet"], 4), unit="FD"),
        dict(name="prior claim: reference, the caption's CLIP text embedding as the image embedding, cosine",
             value=round(ref["text_as_image"]["cosine"], 4), unit="cos"),
    ]
    for label, metrics in label_references(test, extras, train_image, train_extras, block_dims, seeds).items():
        rows.append(dict(name=f"prior claim: reference, {label}, Fréchet distance", value=round(metrics["frechet"], 4),
                         unit="FD"))
        rows.append(dict(name=f"prior claim: reference, {label}, cosine", value=round(metrics["cosine"], 4),
                         unit="cos"))
    rows += diversity_rows(systems, test, extras)
    for steps in steps_list:
        results = {}
        for label, system in systems.items():
            runs = [evaluate_prior(system.prior, system.bank, test, seed=s, steps=steps) for s in seeds]
            results[label] = {k: (float(np.mean([r[k] for r in runs])), float(np.std([r[k] for r in runs])))
                              for k in ("frechet", "cosine")}
        for label in systems:
            fd, cos = results[label]["frechet"], results[label]["cosine"]
            rows.append(dict(name=f"prior claim: {label} prior, {steps} steps, Fréchet distance to held-out image "
                                  f"embeddings (mean over {len(seeds)} seeds, sd {fd[1]:.3f})",
                             value=round(fd[0], 4), unit="FD", target="< unshifted" if label == "shifted" else ""))
            rows.append(dict(name=f"prior claim: {label} prior, {steps} steps, cosine to the paired held-out image "
                                  f"embedding (mean over {len(seeds)} seeds, sd {cos[1]:.4f})",
                             value=round(cos[0], 4), unit="cos", target="> unshifted" if label == "shifted" else ""))
        rows.append(dict(name=f"prior claim: shifted / unshifted Fréchet distance, {steps} steps",
                         value=round(results["shifted"]["frechet"][0] / results["unshifted"]["frechet"][0], 4),
                         unit="x", target="< 1"))
    return rows


def judge_scores(images, rows) -> dict:
    from common.io import to_pil
    from common.judge import judge_images

    return judge_images([to_pil(im, value_range=(0, 1)) for im in images], [(r["digit"], r["color"]) for r in rows])


def claim_language_free(shifted, baseline_prior, test, extras, seeds, guidance: float, baseline_guidance: float,
                        steps: int, n: int = 60) -> list[dict]:
    from common.digits import evaluation_prompts
    from common.pipeline import LatentTextToImage
    from shifted.system import prompt_embeddings

    prompts = evaluation_prompts(n)
    texts = [p["text"] for p in prompts]
    text2image = LatentTextToImage.from_pretrained(str(REPO / "ckpt" / "tiny" / "baseline"))
    decoder = shifted.decoder
    scores: dict[str, list] = {"shifted": [], "unshifted": [], "baseline": [], "ceiling": []}
    test_rows = [{"digit": e["digit"], "color": e["color"]} for e in extras[:n]]
    for seed in seeds:
        for label, system in (("shifted", shifted), ("unshifted", baseline_prior)):
            emb = prompt_embeddings(system, texts, seed)
            images = decoder(emb, num_inference_steps=steps, guidance_scale=guidance,
                             generator=torch.Generator().manual_seed(seed))
            scores[label].append(judge_scores(images, prompts))
        out = text2image(texts, num_inference_steps=steps, guidance_scale=baseline_guidance,
                         generator=torch.Generator().manual_seed(seed), progress=False)
        scores["baseline"].append(judge_scores(out.images, prompts))
        images = decoder(test["image_emb"][:n], num_inference_steps=steps, guidance_scale=guidance,
                         generator=torch.Generator().manual_seed(seed))
        scores["ceiling"].append(judge_scores(images, test_rows))
    what = {
        "shifted": f"language-free decoder + shifted prior (text -> prior -> embedding -> image), guidance {guidance:g}",
        "unshifted": f"language-free decoder + unshifted prior, guidance {guidance:g}",
        "baseline": f"text-conditioned baseline ckpt/tiny/baseline, guidance {baseline_guidance:g}",
        "ceiling": f"language-free decoder on the real CLIP embeddings of the first {n} held-out images (image -> "
                   f"image, judged against their labels), guidance {guidance:g}",
    }
    rows = []
    total = n * len(seeds)
    for label, runs in scores.items():
        for metric in ("digit_accuracy", "color_accuracy", "both_accuracy"):
            value = sum(r[metric] * r["count"] for r in runs) / sum(r["count"] for r in runs)
            rows.append(dict(name=f"language-free claim: {what[label]}: {metric.replace('_', ' ')} "
                                  f"(judge, {total} images, {steps} DDIM steps)",
                             value=round(value, 4), unit="fraction"))
    return rows


def cost(shifted, reps: int, guidance: float, steps: int) -> list[dict]:
    from common.digits import evaluation_prompts
    from shifted.system import prompt_embeddings

    texts = [p["text"] for p in evaluation_prompts(60)]
    emb = prompt_embeddings(shifted, texts, 0)  # warm-up, and the embeddings the decoder timing uses
    shifted.decoder(emb, num_inference_steps=steps, guidance_scale=guidance,
                    generator=torch.Generator().manual_seed(0))
    clip_text, states = shifted.encoder(texts)
    prior_t, decoder_t, encode_t = [], [], []
    from shifted.pipeline import sample_prior

    for i in range(reps):
        t0 = time.perf_counter()
        shifted.encoder(texts)
        t1 = time.perf_counter()
        sample_prior(shifted.prior, shifted.bank, clip_text, states, steps="8",
                     generator=torch.Generator().manual_seed(i))
        t2 = time.perf_counter()
        shifted.decoder(emb, num_inference_steps=steps, guidance_scale=guidance,
                        generator=torch.Generator().manual_seed(i))
        t3 = time.perf_counter()
        encode_t.append(t1 - t0)
        prior_t.append(t2 - t1)
        decoder_t.append(t3 - t2)
    prior_s, decoder_s, encode_s = (statistics.median(v) for v in (prior_t, decoder_t, encode_t))
    params = {
        "prior": sum(p.numel() for p in shifted.prior.parameters()),
        "decoder": sum(p.numel() for m in (shifted.decoder.unet, shifted.decoder.projection) for p in m.parameters()),
    }
    return [
        dict(name="cost: prior sampling, 8 respaced DDPM steps, 60 captions (median s)", value=round(prior_s, 4),
             unit="s"),
        dict(name="cost: caption encoding (CLIP text embedding + text states), 60 captions (median s)",
             value=round(encode_s, 4), unit="s"),
        dict(name=f"cost: decoder sampling, {steps} DDIM steps with CFG + VAE decode, 60 images (median s; UNet + "
                  f"projection {params['decoder']:,} params)", value=round(decoder_s, 4), unit="s"),
        dict(name=f"cost: prior / decoder sampling time (prior {params['prior']:,} params)",
             value=round(prior_s / decoder_s, 4), unit="x"),
    ] + [dict(name=f"cost: peak RSS of a fresh process running only the {part if part != 'nothing' else 'imports'} "
                   f"({what})",
              value=memory_probe(part, guidance, steps), unit="MB")
         for part, what in (("prior", "CLIP text side + prior, 60 captions, 8 steps"),
                            ("decoder", f"decoder, 60 images, {steps} DDIM steps with CFG"),
                            ("nothing", "python + torch + diffusers imported, nothing loaded: the floor"))]


def memory_probe(part: str, guidance: float, steps: int) -> float:
    """Peak RSS (MB) of a subprocess running ``--memory_probe part`` (a fresh process: nothing else counted)."""
    import subprocess

    out = subprocess.run([sys.executable, __file__, "--memory_probe", part, "--guidance", str(guidance), "--steps",
                          str(steps)], capture_output=True, text=True, check=True).stdout
    return round(float(out.strip().splitlines()[-1]), 1)


def run_memory_probe(part: str, checkpoint: Path, guidance: float, steps: int) -> None:
    import diffusers  # noqa: F401  (the baseline of every probe: the libraries themselves)

    from common.digits import evaluation_prompts
    from shifted.system import load_system, prompt_embeddings

    texts = [p["text"] for p in evaluation_prompts(60)]
    if part == "prior":
        system = load_system(checkpoint, need_decoder=False)
        prompt_embeddings(system, texts, 0)
    elif part == "decoder":
        system = load_system(checkpoint, need_prior=False)
        emb = torch.randn(60, system.clip.dim)
        system.decoder(emb, num_inference_steps=steps, guidance_scale=guidance,
                       generator=torch.Generator().manual_seed(0))
    print(vm_hwm_mb())


def main(argv=None) -> int:
    from common.digits import build_digits

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", default="all", choices=("all", "claims", "cost"))
    p.add_argument("--checkpoint", default=str(REPO / "ckpt" / "tiny" / "shifted"))
    p.add_argument("--data", default=str(REPO / "data" / "digits"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--guidance", type=float, default=None, help="decoder guidance (default: sample_cli's)")
    p.add_argument("--baseline_guidance", type=float, default=None,
                   help="baseline text-to-image guidance (default: the same as --guidance)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps of the decoder and the baseline "
                   "(default: sample_cli's)")
    p.add_argument("--ablation_prior", action="append", default=[], metavar="LABEL=FOLDER",
                   help="another prior to score in the prior claim (e.g. a retrained std_scale 1 variant)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no_write", action="store_true")
    p.add_argument("--memory_probe", default=None, choices=("prior", "decoder", "nothing"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from shifted.sample_cli import EVAL_DECODER

    if args.memory_probe:
        run_memory_probe(args.memory_probe, Path(args.checkpoint), args.guidance or 3.0, args.steps or 25)
        return 0

    guidance = args.guidance if args.guidance is not None else EVAL_DECODER["guidance_scale"]
    baseline_guidance = args.baseline_guidance if args.baseline_guidance is not None else guidance
    steps = args.steps or EVAL_DECODER["num_inference_steps"]
    for item in args.ablation_prior:
        if "=" not in item or not (Path(item.rpartition("=")[2]) / "config.json").is_file():
            p.error(f"--ablation_prior {item!r}: expected LABEL=FOLDER with a prior folder (config.json)")
    build_digits(args.data)
    shifted, baseline_prior = load_all(Path(args.checkpoint))
    import shlex

    command = " ".join([COMMAND, shlex.join(argv if argv is not None else sys.argv[1:])]).rstrip()
    records = []
    if args.part in ("all", "cost"):
        records += cost(shifted, args.reps, guidance, steps)
    if args.part in ("all", "claims"):
        from shifted.pipeline import load_prior
        from shifted.system import ShiftedSystem

        test, extras, train_image, train_extras = held_out(shifted, Path(args.data))
        systems = {"shifted": shifted, "unshifted": baseline_prior}
        for item in args.ablation_prior:
            label, _, folder = item.rpartition("=")
            prior, bank = load_prior(folder, clip_models=shifted.clip.names)
            systems[f"ablation {label}"] = ShiftedSystem(prior, bank, shifted.encoder, shifted.clip, None)
        records += claim_prior(systems, test, extras, train_image, train_extras, args.seeds)
        records += claim_language_free(shifted, baseline_prior, test, extras, args.seeds, guidance, baseline_guidance,
                                       steps)
    for r in records:
        r.setdefault("section", SECTION)
        r.setdefault("command", command)
        print(f"{r['name']}: {r['value']} {r['unit']}")
    if not args.no_write:
        from records import write_records

        write_records(records, replace_section=SECTION if args.part == "all" else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
