"""Reading and writing short video clips: frame folders, GIF (PIL) and MP4 / other containers (PyAV).

A clip is a uint8 array ``[F, H, W, 3]`` (RGB, frames in temporal order). Readers take only the frames asked for
(``start``, ``stride``, ``n_frames``) and stop decoding once they have them, so a long video never has to fit in
memory. Every problem a user can cause (missing or unreadable file, no frames, frames of different sizes, too few
frames for the request) is a one-line :class:`common.errors.UserError` naming the file and the fix.

- frame folder: every image file directly inside it (``IMAGE_SUFFIXES``), sorted by file name, as Tune-A-Video's
  data folders (``00000.png`` ...);
- GIF / APNG / animated WebP: PIL's frame sequence, every frame composited to RGB;
- MP4, MOV, MKV, WebM, AVI: decoded with PyAV (``av``, which bundles FFmpeg's libraries); without it such a file is a
  UserError that says ``pip install av``.

Writers: :func:`write_gif` (PIL) and :func:`write_mp4` (PyAV, H.264 in yuv420p; sides padded to even numbers).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image, ImageSequence, UnidentifiedImageError

from common.errors import UserError, one_line


PathLike = Union[str, os.PathLike]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
PIL_VIDEO_SUFFIXES = (".gif", ".apng", ".webp", ".png")
AV_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi")
VIDEO_SUFFIXES = (".gif", ".apng") + AV_SUFFIXES


def av_available() -> bool:
    """Whether PyAV (MP4 decoding and encoding) is installed."""
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


def _rgb(image: Image.Image) -> np.ndarray:
    from common.io import pil_to_rgb

    return np.asarray(pil_to_rgb(image, background=(0, 0, 0)))


def _check_request(n_frames: Optional[int], start: int, stride: int) -> None:
    if n_frames is not None and n_frames < 1:
        raise UserError(f"n_frames must be >= 1 (or None for every frame), got {n_frames}")
    if start < 0 or stride < 1:
        raise UserError(f"start must be >= 0 and stride >= 1, got start {start}, stride {stride}")


def _select(frames: Iterator[np.ndarray], n_frames: Optional[int], start: int, stride: int) -> list[np.ndarray]:
    """Frames ``start, start + stride, ...`` (``n_frames`` of them, or all), stopping as soon as there are enough."""
    out = []
    for index, frame in enumerate(frames):
        if index >= start and (index - start) % stride == 0:
            out.append(frame)
            if n_frames is not None and len(out) == n_frames:
                break
    return out


def _folder_frames(folder: Path) -> Iterator[np.ndarray]:
    from common.io import load_image_rgb

    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    for path in files:
        yield np.asarray(load_image_rgb(path, background=(0, 0, 0)))


def _pil_frames(path: Path) -> Iterator[np.ndarray]:
    from common.io import open_image

    try:
        with open_image(path) as image:
            for frame in ImageSequence.Iterator(image):
                yield _rgb(frame.convert("RGBA") if frame.mode == "P" else frame)
    except UnidentifiedImageError:
        raise UserError(f"{path} is not a video or image file PIL can read: pass a GIF, an MP4 or a folder of "
                        "frames") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise UserError(f"{path} is truncated or corrupt ({one_line(str(err))}): re-export the video") from None


def _av_frames(path: Path) -> Iterator[np.ndarray]:
    try:
        import av
    except ImportError:
        raise UserError(f"reading {path.suffix} videos needs PyAV: pip install av (or pass a GIF or a folder of "
                        "frames)") from None
    try:
        container = av.open(str(path))
    except Exception as err:  # PyAV raises its own FFmpeg error classes (av.error.*), all Exceptions
        raise UserError(f"{path} is not a video FFmpeg can read ({one_line(str(err))[:200]}): re-export it as MP4 "
                        "or GIF, or pass a folder of frames") from None
    try:
        if not container.streams.video:
            raise UserError(f"{path} has no video stream: pass a video file, a GIF or a folder of frames")
        try:
            for frame in container.decode(video=0):
                yield frame.to_ndarray(format="rgb24")
        except UserError:
            raise
        except Exception as err:
            raise UserError(f"{path} could not be decoded ({one_line(str(err))[:200]}): re-export the video") from None
    finally:
        container.close()


def read_video(
    path: PathLike, n_frames: Optional[int] = None, *, start: int = 0, stride: int = 1
) -> np.ndarray:
    """Read a clip as uint8 RGB ``[F, H, W, 3]``: a frame folder, a GIF (or APNG / animated WebP), or an MP4.

    ``n_frames`` frames are taken from index ``start`` every ``stride`` frames (all from ``start`` when None).
    UserError when the path is missing or unreadable, holds no frame, fewer frames than asked for, or frames of
    different sizes.
    """
    _check_request(n_frames, start, stride)
    path = Path(path)
    if not path.exists():
        raise UserError(f"video {path} does not exist: pass a GIF, an MP4 or a folder of frames")
    if path.is_dir():
        frames = _select(_folder_frames(path), n_frames, start, stride)
    elif path.suffix.lower() in AV_SUFFIXES:
        frames = _select(_av_frames(path), n_frames, start, stride)
    else:
        frames = _select(_pil_frames(path), n_frames, start, stride)
    if not frames:
        what = "image files" if path.is_dir() else "frames"
        hint = f" from frame {start}" if start else ""
        raise UserError(f"video {path} has no {what}{hint}: pass a clip with at least one frame ({', '.join(IMAGE_SUFFIXES)} "
                        "files for a folder)")
    sizes = sorted({f.shape[:2] for f in frames})
    if len(sizes) > 1:
        listed = ", ".join(f"{w}x{h}" for h, w in sizes)
        raise UserError(f"frames of {path} differ in size ({listed}): every frame of a clip must have the same size; "
                        "resize them to one size")
    if n_frames is not None and len(frames) < n_frames:
        raise UserError(f"video {path} gives only {len(frames)} frames from frame {start} with stride {stride}, "
                        f"{n_frames} were asked for: pass --n_frames {len(frames)} or fewer")
    return np.stack(frames)


def resize_clip(frames: np.ndarray, size: int) -> np.ndarray:
    """Scale the short side to ``size`` (bicubic, box when shrinking) and centre-crop to ``size x size``."""
    f, h, w, _ = frames.shape
    if (h, w) == (size, size):
        return frames
    scale = size / min(h, w)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    out = []
    for frame in frames:
        image = Image.fromarray(frame).resize(new, Image.BICUBIC if scale > 1 else Image.BOX)
        left, top = (new[0] - size) // 2, (new[1] - size) // 2
        out.append(np.asarray(image.crop((left, top, left + size, top + size))))
    return np.stack(out)


def _as_uint8(frames: Union[np.ndarray, Sequence]) -> np.ndarray:
    array = np.asarray(frames)
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"a clip is [F, H, W, 3], got shape {array.shape}")
    if array.dtype != np.uint8:
        array = np.round(np.clip(array.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)
    return array


def write_gif(frames: np.ndarray, path: PathLike, fps: float = 4.0, scale: int = 1) -> Path:
    """Write an animated GIF (looping) from uint8 ``[F, H, W, 3]`` (or floats in [0, 1]); ``scale`` enlarges
    every frame by pixel repetition (tiny clips are hard to see)."""
    array = _as_uint8(frames)
    images = [Image.fromarray(f) for f in array]
    if scale > 1:
        images = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in images]
    path = Path(path)
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0,
                   disposal=2, optimize=False)
    return path


def write_mp4(frames: np.ndarray, path: PathLike, fps: float = 4.0, scale: int = 1) -> Path:
    """Write an H.264 MP4 (yuv420p) with PyAV; odd sides are padded to even numbers. UserError without PyAV."""
    try:
        import av
    except ImportError:
        raise UserError("writing MP4 needs PyAV: pip install av (the GIF is written without it)") from None
    from fractions import Fraction

    array = _as_uint8(frames)
    if scale > 1:
        array = array.repeat(scale, axis=1).repeat(scale, axis=2)
    f, h, w, _ = array.shape
    padded = np.zeros((f, h + h % 2, w + w % 2, 3), dtype=np.uint8)
    padded[:, :h, :w] = array
    path = Path(path)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4",
                                      rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = padded.shape[2], padded.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "10"} if stream.codec_context.name == "libx264" else {}
        for frame in padded:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_frame_folder(frames: np.ndarray, folder: PathLike) -> Path:
    """Every frame as ``<folder>/00000.png``, ... (the folder must exist)."""
    folder = Path(folder)
    for i, frame in enumerate(_as_uint8(frames)):
        Image.fromarray(frame).save(folder / f"{i:05d}.png")
    return folder
