"""Evaluation metrics shared by the five methods (their papers' evaluation protocols): FID/KID, CLIP scores, masks, frames.

Inputs are image sources (a folder, a list of paths / PIL images, or an ``[N, 3, H, W]`` tensor); networks are
passed in already built (CLIP triples) or read from a local weights file (FID Inception). Nothing downloads.
"""

from common.metrics.clip import (
    clip_frechet_distance,
    clip_image_embeddings,
    clip_image_similarity,
    clip_scores,
    clip_text_embeddings,
    named_clip_models,
    paired_cosine,
)
from common.metrics.frames import frame_consistency, frame_pairs, pixel_frame_consistency
from common.metrics.images import count_images, iter_pil_batches, list_image_files, load_image_folder
from common.metrics.inception import (
    FID_WEIGHTS_FILE,
    image_features,
    inception_features,
    load_fid_inception,
    load_inception_state_dict,
)
from common.metrics.masks import (
    confusion_matrix,
    load_mask,
    mask_agreement,
    parse_stroke_mask,
    parsed_mask_agreement,
    scores_from_confusion,
    stroke_parser,
)
from common.metrics.stats import (
    feature_statistics,
    fid_between,
    fid_from_features,
    frechet_distance,
    kid_from_features,
    load_features,
    load_reference,
    load_statistics,
    mmd2_unbiased,
    polynomial_kernel,
    polynomial_mmd2,
    save_statistics,
)


__all__ = [
    "FID_WEIGHTS_FILE",
    "clip_frechet_distance",
    "clip_image_embeddings",
    "clip_image_similarity",
    "clip_scores",
    "clip_text_embeddings",
    "confusion_matrix",
    "count_images",
    "feature_statistics",
    "fid_between",
    "fid_from_features",
    "frame_consistency",
    "frame_pairs",
    "frechet_distance",
    "image_features",
    "inception_features",
    "iter_pil_batches",
    "kid_from_features",
    "list_image_files",
    "load_features",
    "load_fid_inception",
    "load_image_folder",
    "load_inception_state_dict",
    "load_mask",
    "load_reference",
    "load_statistics",
    "mask_agreement",
    "mmd2_unbiased",
    "named_clip_models",
    "paired_cosine",
    "parse_stroke_mask",
    "parsed_mask_agreement",
    "pixel_frame_consistency",
    "polynomial_kernel",
    "polynomial_mmd2",
    "save_statistics",
    "scores_from_confusion",
    "stroke_parser",
]
