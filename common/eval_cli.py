"""Metric subcommands for ``scripts/evaluate.py``: ``fid``, ``kid``, ``clip-score``, ``clip-fd``, ``mask``, ``frames``.

Wire them in with::

    subparsers = parser.add_subparsers(dest="command", required=True)
    register_metric_subcommands(subparsers)
    args = parser.parse_args()
    args.func(args)          # inside a @cli_entry main, so a UserError prints one line and exits 2

Each handler computes its metric, writes a JSON report atomically (``--out``, default
``outputs/eval/<subcommand>.json``), prints a small table, and returns the report dict.
CLIP models come from repeated ``--clip MODEL=WEIGHTS``: ``MODEL`` is an open_clip model name (``ViT-B-16``) or
the path of an open_clip model-config JSON (tiny test models), ``WEIGHTS`` a local checkpoint; or
``--clip local-dir:FOLDER`` for a folder with ``open_clip_config.json`` and weights. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path

from common.errors import UserError, one_line
from common.io import atomic_write_file, is_torchscript_archive
from common.metrics import (
    clip_frechet_distance,
    clip_image_similarity,
    clip_scores,
    feature_statistics,
    frame_consistency,
    image_features,
    kid_from_features,
    list_image_files,
    load_features,
    load_fid_inception,
    load_mask,
    parsed_mask_agreement,
    save_statistics,
    stroke_parser,
)
from common.metrics.stats import fid_between, is_statistics_file, load_reference


# ----------------------------------------------------------------------------------------------- output helpers


def write_json_atomic(path: str | Path, payload: dict) -> Path:
    """Write ``payload`` as indented JSON, all-or-nothing (:func:`common.io.atomic_write_file`)."""
    path = Path(path)
    with atomic_write_file(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return path


def format_table(rows: list[tuple[str, object]]) -> str:
    """Two aligned columns ``name  value``; floats with 6 significant digits."""
    cells = [(name, f"{value:.6g}" if isinstance(value, float) else str(value)) for name, value in rows]
    width = max(len(name) for name, _ in cells)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in cells)


def _finish(args: argparse.Namespace, report: dict, rows: list[tuple[str, object]]) -> dict:
    path = write_json_atomic(args.out or Path("outputs") / "eval" / f"{args.command_name}.json", report)
    print(format_table(rows))
    print(f"wrote {path}")
    return report


def _score_rows(prefix: str, scores: dict) -> list[tuple[str, object]]:
    rows = [(f"{prefix} [{name}]", value) for name, value in scores.get("per_model", {}).items()]
    return rows + [(f"{prefix} (mean)", scores["mean"])]


# ----------------------------------------------------------------------------------------------- CLIP loading


def parse_clip_spec(spec: str) -> tuple[str, str | None]:
    """``"MODEL=WEIGHTS"`` -> ``(MODEL, WEIGHTS)``; ``"local-dir:FOLDER"`` -> ``(spec, None)``."""
    if spec.startswith("local-dir:"):
        return spec, None
    model, sep, weights = spec.partition("=")
    if not sep or not model or not weights:
        raise UserError(f"--clip {spec!r}: expected MODEL_NAME=WEIGHTS_PATH (or local-dir:FOLDER)")
    return model, weights


def load_clip_triple(spec: str, device: str = "cpu") -> tuple[str, tuple]:
    """Build ``(name, (model, preprocess, tokenizer))`` for one ``--clip`` spec from local files only."""
    import open_clip

    model_ref, weights = parse_clip_spec(spec)
    name = model_ref
    if model_ref.endswith(".json"):
        config = Path(model_ref)
        if not config.is_file():
            raise UserError(f"--clip {spec}: model config {config} not found; pass an open_clip config JSON")
        open_clip.add_model_config(config)
        model_ref = name = config.stem
    elif model_ref.startswith("local-dir:"):
        name = Path(model_ref.removeprefix("local-dir:")).name
    elif model_ref.replace("/", "-") not in open_clip.list_models():
        raise UserError(f"--clip {spec}: unknown open_clip model {model_ref!r}; use e.g. ViT-B-32, ViT-B-16, RN101")
    if weights is not None and not Path(weights).is_file():
        raise UserError(f"--clip {spec}: weights file {weights} not found; pass the local checkpoint path")
    if weights is not None and is_torchscript_archive(weights):
        raise UserError(
            f"--clip {spec}: {weights} is an OpenAI TorchScript archive; save its state_dict as .safetensors and "
            "pass it with the -quickgelu model name (e.g. ViT-B-32-quickgelu)"
        )
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_ref, pretrained=weights, device=device, weights_only=True
        )
        tokenizer = open_clip.get_tokenizer(model_ref)
    except (RuntimeError, ValueError, OSError, KeyError, pickle.UnpicklingError) as err:
        raise UserError(f"--clip {spec}: cannot load the model ({one_line(str(err))[:300]})") from None
    return name, (model.eval(), preprocess, tokenizer)


def load_clip_models(specs: list[str] | None, device: str = "cpu") -> dict[str, tuple]:
    """``{name: (model, preprocess, tokenizer)}`` for repeated ``--clip`` specs; duplicate names get ``#2``..."""
    if not specs:
        raise UserError("no CLIP model given; pass --clip MODEL_NAME=WEIGHTS_PATH (repeat it to average models)")
    models: dict[str, tuple] = {}
    for spec in specs:
        name, triple = load_clip_triple(spec, device)
        key, k = name, 2
        while key in models:
            key, k = f"{name}#{k}", k + 1
        models[key] = triple
    return models


# ----------------------------------------------------------------------------------------------- input helpers


def _image_count_at_least(folder: str, minimum: int, metric: str) -> list[Path]:
    files = list_image_files(folder)
    if len(files) < minimum:
        raise UserError(f"{metric} needs at least {minimum} images in {folder}, found {len(files)}; add images")
    return files


def _match_by_stem(files: list[Path], folder: str, what: str) -> list[Path]:
    """For each file, the file of ``folder`` with the same stem (any image suffix)."""
    by_stem: dict[str, Path] = {}
    for p in list_image_files(folder):
        if p.stem in by_stem:
            raise UserError(f"{what} folder {folder} has two files named {p.stem} ({by_stem[p.stem]}, {p}); "
                            "file names must be unique to pair them with the images")
        by_stem[p.stem] = p
    missing = [f.name for f in files if f.stem not in by_stem]
    if missing:
        raise UserError(
            f"{what} folder {folder} has no file for {len(missing)} images (e.g. {missing[0]}); names must match"
        )
    return [by_stem[f.stem] for f in files]


def read_captions(path: str | Path, files: list[Path], column: str = "text") -> list[str]:
    """Captions paired with ``files``: from ``metadata.jsonl`` (``file_name`` + ``column``) or a ``.txt`` (one a line)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"captions file {path} not found; pass --captions metadata.jsonl or a .txt, one line per image"
        )
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        if len(lines) != len(files):
            raise UserError(
                f"{path} has {len(lines)} captions for {len(files)} images; give one per image, sorted by name"
            )
        return lines
    captions = {}
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            captions[Path(record["file_name"]).name] = str(record[column])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{path}:{number} is not a JSON object with 'file_name' and {column!r}") from None
    missing = [f.name for f in files if f.name not in captions]
    if missing:
        raise UserError(f"{path} has no caption for {len(missing)} images (e.g. {missing[0]}); add them")
    return [captions[f.name] for f in files]


def _inception_features_of(source: str, extractor, args, minimum: int, metric: str):
    if is_statistics_file(source):
        return load_features(source)
    files = _image_count_at_least(source, minimum, metric)
    return image_features(files, extractor, batch_size=args.batch_size, device=args.device)


# ----------------------------------------------------------------------------------------------- handlers


def _fid_side(source: str, extractor, args: argparse.Namespace, save_to: str | None = None):
    """Features of an image folder (optionally saved with their statistics), or what a statistics file holds."""
    if is_statistics_file(source):
        return load_reference(source)
    features = _inception_features_of(source, extractor, args, 2, "FID")
    if save_to:
        save_statistics(save_to, *feature_statistics(features), features=features)
    return features


def run_fid(args: argparse.Namespace) -> dict:
    """``fid GENERATED REFERENCE``: FID between two image folders, or a folder and a statistics file."""
    folders = [source for source in (args.generated, args.reference) if not is_statistics_file(source)]
    for folder in folders:  # fail on empty / 1-image folders before loading the network
        _image_count_at_least(folder, 2, "FID")
    extractor = load_fid_inception(args.inception_weights, args.device) if folders else None
    generated = _fid_side(args.generated, extractor, args)
    reference = _fid_side(args.reference, extractor, args, args.save_reference_stats)
    value = fid_between(generated, reference)
    report = {"metric": "fid", "fid": value, "generated": str(args.generated), "reference": str(args.reference)}
    return _finish(args, report, [("FID", value)])


def run_kid(args: argparse.Namespace) -> dict:
    """``kid GENERATED REFERENCE``: KID (mean, std over subsets) between two folders / feature files."""
    folders = [source for source in (args.generated, args.reference) if not is_statistics_file(source)]
    for folder in folders:
        _image_count_at_least(folder, 2, "KID")
    extractor = load_fid_inception(args.inception_weights, args.device) if folders else None
    generated = _inception_features_of(args.generated, extractor, args, 2, "KID")
    reference = _inception_features_of(args.reference, extractor, args, 2, "KID")
    result = kid_from_features(generated, reference, args.subsets, args.subset_size, args.seed)
    report = {"metric": "kid", **result, "generated": str(args.generated), "reference": str(args.reference)}
    rows = [("KID mean", result["kid_mean"]), ("KID std", result["kid_std"]), ("subset size", result["subset_size"])]
    return _finish(args, report, rows)


def _folder_arg(args: argparse.Namespace, name: str) -> None:
    """``args.<name>`` from the positional form or ``--<name>`` (one of them, not two different ones)."""
    positional, flag = getattr(args, f"{name}_positional", None), getattr(args, name, None)
    if positional and flag and Path(positional) != Path(flag):
        raise UserError(f"two {name} folders given ({positional} and --{name} {flag}); pass one")
    if not (positional or flag):
        raise UserError(f"no {name} folder: pass it as an argument or with --{name} DIR")
    setattr(args, name, positional or flag)


def run_clip_score(args: argparse.Namespace) -> dict:
    """``clip-score DIR`` (or ``--images DIR``): image-text (captions) and/or image-image (``--references``) CLIP
    similarity."""
    _folder_arg(args, "images")
    files = list_image_files(args.images)
    captions_path = args.captions or (Path(args.images) / "metadata.jsonl")
    has_captions = args.captions is not None or Path(captions_path).is_file()
    if not has_captions and args.references is None:
        raise UserError(f"nothing to score: no {captions_path}; pass --captions FILE and/or --references DIR")
    captions = read_captions(captions_path, files, args.caption_column) if has_captions else None
    references = _match_by_stem(files, args.references, "references") if args.references else None
    models = load_clip_models(args.clip, args.device)
    report: dict = {"metric": "clip-score", "images": str(args.images), "count": len(files)}
    rows: list[tuple[str, object]] = []
    if captions is not None:
        report["image_text"] = clip_scores(files, captions, models, batch_size=args.batch_size)
        rows += _score_rows("CLIP image-text", report["image_text"])
    if references is not None:
        report["image_image"] = clip_image_similarity(files, references, models, batch_size=args.batch_size)
        rows += _score_rows("CLIP image-image", report["image_image"])
    return _finish(args, report, rows)


def run_clip_fd(args: argparse.Namespace) -> dict:
    """``clip-fd A B``: Fréchet distance between the CLIP image embeddings of two folders, averaged over models."""
    files_a = _image_count_at_least(args.first, 2, "CLIP Fréchet distance")
    files_b = _image_count_at_least(args.second, 2, "CLIP Fréchet distance")
    models = load_clip_models(args.clip, args.device)
    result = clip_frechet_distance(files_a, files_b, models, batch_size=args.batch_size, normalize=args.normalize)
    report = {"metric": "clip-fd", **result, "first": str(args.first), "second": str(args.second)}
    return _finish(args, report, _score_rows("CLIP FD", result))


def run_mask(args: argparse.Namespace) -> dict:
    """``mask IMAGES MASKS`` (or ``--images``/``--masks``): parse each generated image, compare with its mask."""
    _folder_arg(args, "images")
    _folder_arg(args, "masks")
    files = list_image_files(args.images)
    masks = [load_mask(path, args.num_classes) for path in _match_by_stem(files, args.masks, "masks")]
    result = parsed_mask_agreement(files, masks, args.num_classes, stroke_parser(args.threshold), args.ignore_index)
    report = {"metric": "mask", **result, "images": str(args.images), "masks": str(args.masks), "count": len(files)}
    rows = [("pixel accuracy", result["pixel_accuracy"]), ("mean IoU", result["mean_iou"])]
    rows += [(f"IoU class {c}", "absent" if iou is None else iou) for c, iou in enumerate(result["per_class_iou"])]
    return _finish(args, report, rows)


def _clip_folders(root: str) -> list[Path]:
    path = Path(root)
    if not path.is_dir():
        raise UserError(f"frames folder {path} does not exist; pass a folder of frames or of clip folders")
    subfolders = sorted(p for p in path.iterdir() if p.is_dir())
    return subfolders or [path]


def run_frames(args: argparse.Namespace) -> dict:
    """``frames DIR``: frame consistency of one clip (frames in DIR) or of each clip subfolder, then their mean."""
    models = load_clip_models(args.clip, args.device) if args.clip else None
    per_clip = {folder.name: frame_consistency(folder, models, args.pairs) for folder in _clip_folders(args.frames)}
    mean = sum(r["mean"] for r in per_clip.values()) / len(per_clip)
    method = "clip" if models else "pixel"
    report = {"metric": "frames", "method": method, "pairs": args.pairs, "mean": mean, "clips": per_clip}
    rows = [(f"{method} consistency [{name}]", r["mean"]) for name, r in per_clip.items()]
    return _finish(args, report, rows + [(f"{method} consistency (mean)", mean)])


# ----------------------------------------------------------------------------------------------- registration


def _common(parser: argparse.ArgumentParser, name: str, batch_size: int | None) -> None:
    """``--out`` for every subcommand; ``--batch_size``/``--device`` for those that run a network."""
    parser.add_argument("--out", type=Path, default=None, help=f"JSON report path (default outputs/eval/{name}.json)")
    if batch_size is not None:
        parser.add_argument("--batch_size", "--batch-size", dest="batch_size", type=int, default=batch_size)
        parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.set_defaults(command_name=name)


def _clip_option(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument(
        "--clip",
        action="append",
        required=required,
        metavar="MODEL=WEIGHTS",
        help="open_clip model name (or config .json) = local weights; repeat to average. OpenAI weights need the "
        "-quickgelu names: ViT-B-16-quickgelu, ViT-B-32-quickgelu, RN101-quickgelu (Shifted Diffusion's protocol)",
    )


def _inception_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("generated", help="folder of generated images (or a .npz/.safetensors statistics file)")
    parser.add_argument("reference", help="folder of reference images (or a .npz/.safetensors statistics file)")
    parser.add_argument(
        "--inception_weights",
        "--inception-weights",
        dest="inception_weights",
        required=True,
        help="local FID Inception weights (pt_inception-2015-12-05-6726825d.pth or a .safetensors copy)",
    )


def register_metric_subcommands(subparsers) -> None:
    """Add ``fid``, ``kid``, ``clip-score``, ``clip-fd``, ``mask``, ``frames`` to an argparse subparsers object.

    Each subcommand sets ``args.func`` to its handler (``handler(args) -> report dict``).
    """
    fid = subparsers.add_parser("fid", help="Fréchet Inception Distance between two image sets")
    _inception_options(fid)
    fid.add_argument(
        "--save_reference_stats",
        "--save-reference-stats",
        dest="save_reference_stats",
        default=None,
        help="also save the reference folder's mu/sigma/features to this .npz/.safetensors (reuse it as REFERENCE)",
    )
    _common(fid, "fid", 50)
    fid.set_defaults(func=run_fid)

    kid = subparsers.add_parser("kid", help="Kernel Inception Distance (unbiased MMD^2, cubic kernel)")
    _inception_options(kid)
    kid.add_argument("--subsets", type=int, default=100)
    kid.add_argument("--subset_size", "--subset-size", dest="subset_size", type=int, default=1000)
    kid.add_argument("--seed", type=int, default=0)
    _common(kid, "kid", 50)
    kid.set_defaults(func=run_kid)

    clip_score = subparsers.add_parser(
        "clip-score", help="CLIP image-text / image-image similarity, averaged over models"
    )
    clip_score.add_argument("images_positional", nargs="?", metavar="IMAGES",
                            help="folder of generated images (searched recursively; same as --images)")
    clip_score.add_argument("--images", default=None, help="folder of generated images")
    clip_score.add_argument(
        "--captions", default=None, help="metadata.jsonl (file_name + caption) or .txt, one a line"
    )
    clip_score.add_argument("--caption_column", "--caption-column", dest="caption_column", default="text")
    clip_score.add_argument("--references", default=None, help="folder of ground-truth images with matching names")
    _clip_option(clip_score, required=True)
    _common(clip_score, "clip-score", 32)
    clip_score.set_defaults(func=run_clip_score)

    clip_fd = subparsers.add_parser("clip-fd", help="Fréchet distance in CLIP image-embedding space")
    clip_fd.add_argument("first", help="folder of images")
    clip_fd.add_argument("second", help="folder of images")
    clip_fd.add_argument("--normalize", action="store_true", help="L2-normalise embeddings before fitting Gaussians")
    _clip_option(clip_fd, required=True)
    _common(clip_fd, "clip-fd", 32)
    clip_fd.set_defaults(func=run_clip_fd)

    mask = subparsers.add_parser("mask", help="pixel accuracy and mIoU of parsed generated images vs input masks")
    mask.add_argument("images_positional", nargs="?", metavar="IMAGES", help="folder of generated images (or --images)")
    mask.add_argument("masks_positional", nargs="?", metavar="MASKS", help="folder of masks (or --masks)")
    mask.add_argument("--images", default=None, help="folder of generated images")
    mask.add_argument("--masks", default=None, help="folder of conditioning masks, same file stems as the images")
    mask.add_argument("--num_classes", "--num-classes", dest="num_classes", type=int, default=2)
    mask.add_argument("--threshold", type=float, default=0.5, help="stroke parser: channel-max threshold in [0, 1)")
    mask.add_argument("--ignore_index", "--ignore-index", dest="ignore_index", type=int, default=None)
    _common(mask, "mask", None)
    mask.set_defaults(func=run_mask)

    frames = subparsers.add_parser("frames", help="frame consistency of a clip (CLIP cosine, or pixel-level)")
    frames.add_argument("frames", help="folder of frames in sorted order, or a folder of such clip folders")
    frames.add_argument("--pairs", choices=("consecutive", "all"), default="consecutive")
    _clip_option(frames, required=False)
    _common(frames, "frames", 32)
    frames.set_defaults(func=run_frames)
