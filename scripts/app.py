"""A local web page to try every method side by side (NiceGUI): one tab per registered method, one shared panel.

    python scripts/app.py                                   # http://127.0.0.1:7860, the shipped tiny checkpoints
    python scripts/app.py --host 0.0.0.0 --port 8080 --checkpoint_root /models/dlab --max_upload_mb 5
    python scripts/app.py --shifted_checkpoint out/shifted  # one method's own folder

The tabs and their controls come from the method registry (``common.methods``): each control is a field of the
method's settings dataclass, and a click calls the method's pipeline with a settings object, the same call
``scripts/sample.py`` makes, so the same seed and settings give the same images. The settings JSON offered for
download holds the ``scripts/sample.py`` command that reproduces the grid. The page is served on 127.0.0.1 unless
``--host`` says otherwise; it fetches nothing from the internet. Uploads must be images (PNG, JPEG, BMP, GIF, WebP,
TIFF) no larger than ``--max_upload_mb``: anything else is refused with a message on the page (and over-long
requests with HTTP 413 before they are read).

The module splits in two: the generation back end (``run_job``, ``check_upload``, ``Shared``: plain Python, tested
without a browser) and the page (``build_page``, NiceGUI imported only there).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import io
import json
import shlex
import shutil
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from common import methods
from common.errors import UserError, one_line


REPO = Path(__file__).resolve().parent.parent
MAX_STEPS = 1000  # the training schedules have 1000 steps: a plan cannot be longer
MAX_IMAGES = 16
DEFAULT_MAX_UPLOAD_MB = 8.0
MAX_UPLOAD_PIXELS = 4096 * 4096
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")
UPLOAD_KINDS = ("image", "images", "mask")


def page_methods() -> list[str]:
    """The registered methods, one tab each: the methods first, the baseline they are compared with last."""
    names = list(methods.names())
    return [n for n in names if n != "baseline"] + [n for n in names if n == "baseline"]


# ------------------------------------------------------------------------------------------------------ back end


@dataclass
class Shared:
    """The shared panel: the shared settings of every method. ``sampler="default"`` / ``eta=None`` /
    ``guidance_scale=None`` keep the method's own default (SDG samples DDPM without CFG, CoDiff DDIM with eta 1),
    exactly as on the command line."""

    seed: int = 0
    steps: int = 25
    sampler: str = "default"
    eta: Optional[float] = None
    guidance_scale: Optional[float] = None
    num_images: int = 4

    @classmethod
    def from_values(cls, values: dict) -> Shared:
        """Check raw page values (numbers may come as floats or None) and build the panel; UserError if wrong."""
        def integer(name, low, high):
            value = values.get(name)
            if value is None or value == "":
                raise UserError(f"{name.replace('_', ' ')} is empty: enter a whole number between {low} and {high}")
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise UserError(f"{name.replace('_', ' ')} must be a whole number, got {value!r}") from None
            if number != int(number) or not low <= number <= high:
                raise UserError(f"{name.replace('_', ' ')} must be a whole number between {low} and {high}, "
                                f"got {value:g}")
            return int(number)

        def real(name, low, high):
            value = values.get(name)
            if value is None or value == "":
                return None  # the method's default
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise UserError(f"{name.replace('_', ' ')} must be a number, got {value!r}") from None
            if not low <= number <= high:
                raise UserError(f"{name.replace('_', ' ')} must lie in [{low:g}, {high:g}], got {number:g}")
            return number

        sampler_name = values.get("sampler") or "default"
        if sampler_name not in ("default", "ddim", "ddpm"):
            raise UserError(f"sampler {sampler_name!r}: choose ddim, ddpm or the method's default")
        return cls(seed=integer("seed", 0, 2**32 - 1), steps=integer("steps", 1, MAX_STEPS), sampler=sampler_name,
                   eta=real("eta", 0.0, 1.0), guidance_scale=real("guidance_scale", 0.0, 100.0),
                   num_images=integer("num_images", 1, MAX_IMAGES))

    def values(self) -> dict:
        """The method settings this panel sets (the empty fields left to the method's defaults)."""
        out = {"seed": self.seed, "num_inference_steps": self.steps}
        if self.sampler != "default":
            out["sampler"] = self.sampler
        if self.eta is not None:
            out["eta"] = self.eta
        if self.guidance_scale is not None:
            out["guidance_scale"] = self.guidance_scale
        return out


@dataclass
class Job:
    """One click of a tab's Generate button. ``options``: the tab's controls (settings field -> value);
    ``uploads``: settings field -> path of a checked image saved by the page."""

    method: str
    prompt: str
    shared: Shared
    options: dict = field(default_factory=dict)
    uploads: dict = field(default_factory=dict)
    checkpoint: Optional[str] = None


@dataclass
class Result:
    images: Any  # [N, 3, H, W] float in [0, 1], or None for text output
    texts: Optional[list]
    prompts: list
    settings: dict
    grid_path: Optional[Path]
    settings_path: Path
    influence: dict = field(default_factory=dict)  # modality -> PIL grid of the maps of every step (sample 0)
    seconds: float = 0.0
    masks: list = field(default_factory=list)  # the class-id masks the images were conditioned on, in colour
    influence_labels: dict = field(default_factory=dict)  # modality -> the label of each tile ("step 1, t=981")
    load_seconds: float = 0.0  # time spent loading the checkpoint (0 when it was already loaded)


def check_upload(name: str, data: bytes, max_bytes: int):
    """A PIL image from uploaded bytes, or UserError: larger than ``max_bytes``, not an image, not a still image
    format we read, or more than MAX_UPLOAD_PIXELS pixels."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > max_bytes:
        raise UserError(f"{name} is {len(data) / 2**20:.1f} MB, larger than the {max_bytes / 2**20:g} MB upload "
                        "limit: upload a smaller image (or start the app with a larger --max_upload_mb)")
    if not data:
        raise UserError(f"{name} is empty: upload an image file")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            fmt, size = probe.format, probe.size
            if size[0] * size[1] > MAX_UPLOAD_PIXELS:
                raise UserError(f"{name} is {size[0]}x{size[1]} pixels: the limit is {MAX_UPLOAD_PIXELS} pixels")
            probe.verify()
        image = Image.open(io.BytesIO(data))
        image.load()
    except UserError:
        raise
    except Image.DecompressionBombError:
        raise UserError(f"{name} declares more pixels than can be decoded safely: the limit is {MAX_UPLOAD_PIXELS} "
                        "pixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise UserError(f"{name} is not an image: upload a PNG, JPEG, BMP, GIF, WebP or TIFF file") from None
    if fmt not in IMAGE_FORMATS:
        raise UserError(f"{name} is a {fmt} file: upload a PNG, JPEG, BMP, GIF, WebP or TIFF image")
    return image


def default_checkpoint(method: str, checkpoint_root: Optional[str] = None) -> str:
    """``<checkpoint_root>/<the method's path under ckpt/tiny>`` or the shipped tiny checkpoint."""
    return str(methods.get(method).checkpoint_path(checkpoint_root))


def prompt_lines(text: str) -> list:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def job_settings(job: Job, spec: methods.MethodSpec):
    """The method's settings object for a job: the tab's controls, the uploads, the shared panel and the prompts
    (cycled over the images; a label when the run needs none). UserError if anything is wrong."""
    values = dict(job.options)
    fields = {f.name: f for f, _ in methods.settings_fields(spec.settings)}
    for name, path in job.uploads.items():
        if name not in fields:
            raise UserError(f"upload {name!r} is not a setting of {spec.name}")
        values[name] = [str(path)] if fields[name].metadata.get("kind") == "images" else str(path)
    values.update(job.shared.values())
    settings = methods.settings_from(spec.settings, values)
    prompts = prompt_lines(job.prompt)
    if not prompts:
        if settings.needs_prompt():
            raise UserError("the prompt is empty: write what to generate (one prompt per line)")
        prompts = [f"{spec.name} sample"]
    settings.prompts = [prompts[i % len(prompts)] for i in range(job.shared.num_images)]
    settings.check()
    return settings


def sample_command(spec: methods.MethodSpec, checkpoint: str, settings, prompts: list) -> list:
    """The ``scripts/sample.py`` command line that reproduces an image run (for the downloaded settings)."""
    argv = ["python", "scripts/sample.py", "--method", spec.name, "--checkpoint", str(checkpoint)]
    for p in prompts:
        argv += ["--prompt", p]
    return argv + ["--num_images", str(len(settings.prompts)), *methods.settings_argv(settings)]


_PIPELINES: dict = {}  # (method, checkpoint) -> the loaded pipeline: the last one used is kept


def pipeline_for(spec: methods.MethodSpec, checkpoint: str, callback=None):
    """The method's loaded pipeline; a checkpoint not loaded yet is announced through ``callback(message, 0, 0)``
    first (a cold load takes tens of seconds on a CPU)."""
    key = (spec.name, str(checkpoint))
    if key not in _PIPELINES:
        if callback is not None:
            callback(loading_message(spec, checkpoint), 0, 0)
        _PIPELINES.clear()
        _PIPELINES[key] = spec.load(checkpoint, "cpu")
    return _PIPELINES[key]


def display_path(path) -> str:
    """A checkpoint path as the page shows it: relative to the repository when inside it."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def loading_message(spec: methods.MethodSpec, checkpoint: str) -> str:
    return f"loading {spec.label} from {display_path(checkpoint)} (first use; later runs reuse it)"


INFLUENCE_PER_ROW = 10
SCALE_BAR_HEIGHT = 10


def influence_step_labels(timesteps, count: int) -> list:
    """``step i, t=T`` for each recorded step (``step i`` alone when the timesteps are unknown)."""
    times = list(timesteps or [])
    return [f"step {i + 1}" + (f", t={int(times[i])}" if i < len(times) else "") for i in range(count)]


def labelled_influence_grid(maps, labels: list, upscale: int = 4, per_row: int = INFLUENCE_PER_ROW):
    """``maps [S, 1, h, w]`` in [0, 1] as one grey grid, each tile captioned with its label above it (the step
    number on the first line, the model timestep on the second), and a black-to-white scale bar (0 to 1) below."""
    import torch
    from PIL import Image, ImageDraw, ImageFont

    from common.io import to_pil

    font = ImageFont.load_default()
    maps = torch.nn.functional.interpolate(maps.float(), scale_factor=upscale, mode="nearest").clamp(0, 1)
    tile_h, tile_w = maps.shape[-2:]
    cell_w, caption_h, pad = max(tile_w, 56), 24, 4
    rows = -(-len(maps) // per_row)
    cols = min(len(maps), per_row)
    width = cols * (cell_w + pad) + pad
    bar_top = rows * (tile_h + caption_h + pad) + pad
    height = bar_top + SCALE_BAR_HEIGHT + 16
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for index, (image, label) in enumerate(zip(maps, labels)):
        row, col = divmod(index, per_row)
        x, y = pad + col * (cell_w + pad), pad + row * (tile_h + caption_h + pad)
        draw.multiline_text((x, y), label.replace(", ", "\n"), fill=(0, 0, 0), font=font, spacing=1)
        grid.paste(to_pil(image, value_range=(0.0, 1.0)).convert("RGB"), (x, y + caption_h))
    bar_w = max(width - 2 * pad - 40, 20)
    for i in range(bar_w):  # the scale: weight 0 (black) to weight 1 (white), as the tiles draw them
        level = round(255 * i / (bar_w - 1))
        draw.line([(pad + 20 + i, bar_top), (pad + 20 + i, bar_top + SCALE_BAR_HEIGHT - 1)], fill=(level,) * 3)
    draw.rectangle([pad + 19, bar_top - 1, pad + 20 + bar_w, bar_top + SCALE_BAR_HEIGHT], outline=(0, 0, 0))
    draw.text((pad, bar_top), "0", fill=(0, 0, 0), font=font)
    draw.text((pad + 24 + bar_w, bar_top), "1", fill=(0, 0, 0), font=font)
    draw.text((pad + 20, bar_top + SCALE_BAR_HEIGHT + 2), "influence weight", fill=(0, 0, 0), font=font)
    grid.info["scale_bar"] = (pad + 20, bar_top, bar_w)  # where the bar is (tests read it back)
    return grid


def _influence_grids(influence, modalities, timesteps=None, upscale: int = 4) -> tuple:
    """``(modality -> labelled grid, modality -> tile labels)`` of the influence maps of sample 0 at every step
    (white = weight 1), as the released ``--return_influence_function`` draws them, plus step labels and a scale."""
    out, labels = {}, {}
    upscale = max(upscale, 48 // max(1, int(influence.shape[-1])))  # tiles at least ~48 px wide: readable
    for m, name in enumerate(modalities):
        maps = influence[:, 0, m:m + 1]  # [S, 1, h, w]
        labels[name] = influence_step_labels(timesteps, len(maps))
        out[name] = labelled_influence_grid(maps, labels[name], upscale)
    return out, labels


def coloured_masks(masks, palette, scale: int = 4) -> list:
    """Class-id masks ``[N, H, W]`` as RGB images in the checkpoint's palette, ``scale`` x larger."""
    import numpy as np
    from PIL import Image

    colours = np.asarray(palette, dtype=np.uint8)
    out = []
    for ids in masks:
        rgb = Image.fromarray(colours[np.asarray(ids, dtype=np.int64).clip(0, len(colours) - 1)])
        out.append(rgb.resize((rgb.width * scale, rgb.height * scale), Image.NEAREST))
    return out


def run_job(job: Job, output_dir, checkpoint_root: Optional[str] = None, callback=None) -> Result:
    """Generate for one job with the method's pipeline; write ``grid.png`` (image output) and ``settings.json`` to
    ``output_dir``. ``callback(stage, steps_done, total)``: the sampler's progress. Bad input is a UserError with a
    one-line message."""
    from common.io import save_image_grid

    start = time.perf_counter()
    if job.method not in methods.names():
        raise UserError(f"unknown method {job.method!r}: choose one of {', '.join(page_methods())}")
    spec = methods.get(job.method)
    job.checkpoint = job.checkpoint or default_checkpoint(job.method, checkpoint_root)
    settings = job_settings(job, spec)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if not Path(job.checkpoint).is_dir():
        raise UserError(f"checkpoint folder {job.checkpoint} does not exist: start the app with "
                        f"--{job.method}_checkpoint or --checkpoint_root")
    cached, loading = (spec.name, str(job.checkpoint)) in _PIPELINES, time.perf_counter()
    pipeline = pipeline_for(spec, job.checkpoint, callback)
    load_seconds = 0.0 if cached else time.perf_counter() - loading
    generation = pipeline(settings, callback=callback)
    influence, influence_labels, masks = {}, {}, []
    if "influence" in generation.extras:
        influence, influence_labels = _influence_grids(generation.extras["influence"], generation.extras["modalities"],
                                                       generation.extras.get("timesteps"))
    if generation.extras.get("masks") is not None:
        masks = coloured_masks(generation.extras["masks"], generation.extras["mask_palette"])
    record = {
        "method": job.method, "prompt": job.prompt, "controls": job.options,
        "uploads": {k: str(v) for k, v in job.uploads.items()}, **asdict(job.shared),
        "checkpoint": str(job.checkpoint), "settings": methods.settings_dict(settings),
    }
    images, texts, grid_path = generation.images, generation.texts, None
    if images is not None:
        images = images.cpu()
        record["command"] = shlex.join(sample_command(spec, job.checkpoint, settings, prompt_lines(job.prompt)
                                                      or settings.prompts[:1]))
        grid_path = output_dir / "grid.png"
        save_image_grid(images, grid_path, nrow=min(8, len(images)), value_range=(0, 1))
        record["outputs"] = {"grid": "grid.png", "prompts": settings.prompts}
    else:
        record["outputs"] = {"texts": texts, "sources": settings.prompts}
    settings_path = output_dir / "settings.json"
    settings_path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return Result(images=images, texts=texts, prompts=list(settings.prompts), settings=record, grid_path=grid_path,
                  settings_path=settings_path, influence=influence, seconds=time.perf_counter() - start,
                  masks=masks, influence_labels=influence_labels, load_seconds=load_seconds)


class Progress:
    """The sampler's progress for the page: the pipelines' ``callback`` records (stage, step, total) here."""

    def __init__(self):
        self.lock = threading.Lock()
        self.desc, self.n, self.total, self.running = "", 0, 0, False

    def report(self, desc, n, total):
        with self.lock:
            self.desc, self.n, self.total = desc or "sampling", n, total

    def snapshot(self):
        with self.lock:
            return self.desc, self.n, self.total, self.running


PROGRESS = Progress()
JOB_LOCK = threading.Lock()  # one generation at a time (CPU machines)


def run_tracked(job: Job, output_dir, checkpoint_root=None) -> Result:
    with PROGRESS.lock:
        PROGRESS.running, PROGRESS.desc, PROGRESS.n, PROGRESS.total = True, "loading", 0, 0
    try:
        return run_job(job, output_dir, checkpoint_root, callback=PROGRESS.report)
    finally:
        with PROGRESS.lock:
            PROGRESS.running = False


# ---------------------------------------------------------------------------------------------------------- page


def data_url(image) -> str:
    """A PIL image or ``[3, H, W]`` tensor in [0, 1] as a PNG data URL."""
    from common.io import to_pil

    buffer = io.BytesIO()
    to_pil(image, value_range=(0, 1)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def sampling_defaults(method: str) -> dict:
    """The method's own sampler, eta and guidance scale (its settings dataclass): what its tab shows filled in."""
    d = methods.get(method).settings()
    return {"sampler": d.sampler, "eta": float(d.eta), "guidance_scale": float(d.guidance_scale)}


def method_defaults() -> str:
    """Each method's defaults for the sampling settings, one line (the server's start-up message)."""
    parts = []
    for m in page_methods():
        d = sampling_defaults(m)
        parts.append(f"{methods.get(m).label} {d['sampler']}, eta {d['eta']:g}, guidance {d['guidance_scale']:g}")
    return "; ".join(parts)


def page_fields(spec: methods.MethodSpec) -> list:
    """``(field, type)`` of the settings shown in a method's tab: its own, not the shared panel's."""
    return [(f, kind) for f, kind in methods.settings_fields(spec.settings)
            if f.metadata.get("page", True) and f.name not in methods.SHARED_FIELDS]


def read_control(f: dataclasses.Field, kind, value):
    """A control's raw value as the field's type; UserError naming the control when it cannot be."""
    label = f.metadata.get("label") or f.name.replace("_", " ")
    default = f.default if f.default is not dataclasses.MISSING else None
    if kind is bool:
        return bool(value)
    if value is None or value == "":
        if default is None:
            return None
        if kind in (int, float):
            raise UserError(f"{label} is empty: enter a number (default {default:g})")
        return default
    if kind is int:
        number = float(value)
        if number != int(number):
            raise UserError(f"{label} must be a whole number, got {value!r}")
        return int(number)
    if kind is float:
        return float(value)
    return str(value).strip()


class MaskCanvas:
    """A class-id mask painted with the mouse: ``ids`` ``[H, W]`` uint8, shown ``scale`` x larger."""

    def __init__(self, height: int, width: int, palette, scale: int = 8):
        import numpy as np

        self.ids = np.zeros((height, width), dtype=np.uint8)
        self.palette = np.asarray(palette, dtype=np.uint8)
        self.scale = scale

    def paint(self, x: float, y: float, class_id: int, radius: int) -> None:
        h, w = self.ids.shape
        cx, cy = int(x // self.scale), int(y // self.scale)
        self.ids[max(cy - radius, 0):min(cy + radius + 1, h), max(cx - radius, 0):min(cx + radius + 1, w)] = class_id

    def clear(self) -> None:
        self.ids[:] = 0

    def render(self):
        from PIL import Image

        rgb = Image.fromarray(self.palette[self.ids])
        return rgb.resize((rgb.width * self.scale, rgb.height * self.scale), Image.NEAREST)

    def save(self, path: Path) -> Path:
        from PIL import Image

        Image.fromarray(self.ids).save(path)  # mode L: the pixel values are the class ids
        return path


def build_page(config: argparse.Namespace) -> None:  # noqa: C901  (one page, many controls)
    """The page: shared panel, one tab per registered method, outputs, progress, downloads. Runs once per visit."""
    from nicegui import run, ui

    limit = int(config.max_upload_mb * 2**20)
    folder: list[Path] = []
    names = page_methods()
    specs = {m: methods.get(m) for m in names}

    def session_dir() -> Path:
        """This visit's folder for grids, settings and uploads: made on first use (a bare GET of the page, as a
        health check does, leaves nothing behind) and removed when NiceGUI deletes the client (tab closed past
        the reconnect timeout), so a long-running server does not fill the disk."""
        if not folder:
            folder.append(Path(tempfile.mkdtemp(prefix="dlab-app-", dir=config.work_dir)))
        return folder[0]

    ui.context.client.on_delete(lambda: [shutil.rmtree(f, ignore_errors=True) for f in folder])
    checkpoints = {m: getattr(config, f"{m}_checkpoint", None) or default_checkpoint(m, config.checkpoint_root)
                   for m in names}
    ui.add_css(".pixelated img { image-rendering: pixelated; } .app-error { color: #c10015; font-weight: 600; }"
               " .app-upload .q-uploader__subtitle { display: none; }")

    ui.label("diffusion-lab: every method side by side").classes("text-h5")
    with ui.card().classes("w-full"):
        ui.label("Settings of every tab (sampler, eta and guidance are in each tab: their defaults differ)"
                 ).classes("text-subtitle1")
        with ui.row().classes("items-end"):
            seed = ui.number("seed", value=0, format="%d").classes("app-seed w-28")
            steps = ui.number("steps", value=25, format="%d",
                              validation={f"1 to {MAX_STEPS}": lambda v: v is not None and 1 <= v <= MAX_STEPS}
                              ).classes("app-steps w-28")
            num_images = ui.number("images", value=4, format="%d",
                                   validation={f"1 to {MAX_IMAGES}": lambda v: v is not None
                                               and 1 <= v <= MAX_IMAGES}).classes("app-num-images w-28")
        with ui.row().classes("items-center w-full"):
            progress_bar = ui.linear_progress(value=0, show_value=False).classes("app-progress w-64")
            progress_label = ui.label("idle").classes("app-progress-label")

    def shared_values(sampling: dict) -> Shared:
        """The shared panel plus the tab's sampler / eta / guidance (``sampling``: their widgets)."""
        return Shared.from_values(dict(seed=seed.value, steps=steps.value, num_images=num_images.value,
                                       **{name: widget.value for name, widget in sampling.items()}))

    active: dict = {}  # the status label of the tab that is generating: it shows the progress too

    def progress_text(desc: str, n: int, total: int) -> str:
        return f"{desc}: step {n}/{total}" if total else f"{desc}..."

    def tick() -> None:
        desc, n, total, running = PROGRESS.snapshot()
        if running:
            progress_bar.set_value(n / total if total else 0.0)
            progress_label.set_text(progress_text(desc, n, total))
            if active.get("status") is not None:
                active["status"].set_text(progress_text(desc, n, total))
        elif progress_label.text != "idle":  # a last step report may land after the run's own reset
            progress_bar.set_value(0)
            progress_label.set_text("idle")

    ui.timer(0.25, tick)

    def upload_box(label: str, state: dict, key: str, error_label):
        """An image upload checked on the server (type, size) and also refused by the browser above the limit. Its
        state is a line of its own (none yet / the image taken, with a thumbnail / refused), not Quasar's byte
        counter, which reads "0.0B / 0.00%" before anything is chosen."""
        with ui.row().classes("items-center gap-2"):
            thumb = ui.image("").props("no-spinner no-transition").classes(
                f"app-upload-thumb-{key} w-12 h-12 pixelated")
            thumb.set_visibility(False)
            info = ui.label("no image uploaded yet").classes(f"app-upload-info-{key} text-caption")

        async def on_upload(e):
            data = await e.file.read()
            try:
                image = check_upload(e.file.name, data, limit)
            except UserError as err:
                state.pop(key, None)
                info.set_text(f"refused: {e.file.name} (see the message above); no image uploaded")
                thumb.set_visibility(False)
                error_label.set_text(f"error: {one_line(str(err))}")
                ui.notify(one_line(str(err)), type="negative")
                e.sender.reset()
                return
            path = session_dir() / f"{key}-{int(time.time() * 1000)}.png"
            image.save(path, format="PNG")
            state[key] = path
            error_label.set_text("")
            info.set_text(f"uploaded: {e.file.name} ({image.width}x{image.height} {image.mode}, "
                          f"{len(data) / 1024:.1f} KB); used by the next Generate")
            thumb.set_source(data_url(image.convert("RGB")))
            thumb.set_visibility(True)
            e.sender.reset()  # the file list empties: the line above is the upload's state

        def on_rejected():
            message = (f"upload refused: the file is larger than the {config.max_upload_mb:g} MB limit "
                       "(start the app with --max_upload_mb to raise it)")
            error_label.set_text(f"error: {message}")
            info.set_text("refused: over the size limit; " + ("the previous image is kept" if key in state
                                                              else "no image uploaded"))
            ui.notify(message, type="negative")

        return ui.upload(label=label + f" (up to {config.max_upload_mb:g} MB)", auto_upload=True,
                         max_file_size=limit, on_upload=on_upload, on_rejected=on_rejected
                         ).classes(f"app-upload-{key} app-upload").props("flat bordered")

    def mask_control(method: str, f, uploads: dict, error_label):
        """A class-id mask: the test mask of the prompt's digit (the method's default), an upload, or a drawing."""
        spec = specs[method]
        fmt = spec.mask_format(checkpoints[method]) if spec.mask_format else None
        size = fmt.image_size if fmt is not None and fmt.image_size else (32, 32)
        classes = list(fmt.class_names) if fmt is not None else ["background", "stroke"]
        palette = list(fmt.palette) if fmt is not None else [(0, 0, 0), (255, 255, 255)]
        ui.label(f"{f.metadata.get('label') or 'mask'}: the layout the mask model follows "
                 f"({', '.join(classes)})").classes("text-subtitle2")
        source = ui.radio({"default": "a test mask of the prompt's digit (default)", "upload": "upload a mask",
                           "draw": "draw a mask"}, value="default").props("inline").classes("app-mask-source")
        upload_state: dict = {}
        with ui.column().bind_visibility_from(source, "value", value="upload"):
            upload_box("mask (class-id PNG, palette colours or grey levels = ids)", upload_state, f.name,
                       error_label)
        with ui.column().bind_visibility_from(source, "value", value="draw"):
            canvas = MaskCanvas(size[0], size[1], palette, scale=max(1, 256 // max(size)))
            with ui.row().classes("items-center"):
                brush = ui.select({i: name for i, name in enumerate(classes)}, value=min(1, len(classes) - 1),
                                  label="paint class").classes("w-36")
                radius = ui.number("brush radius", value=1, format="%d").classes("w-28")
            drawing = {"down": False}

            def on_mouse(e):
                if e.type == "mousedown":
                    drawing["down"] = True
                elif e.type in ("mouseup", "mouseleave"):
                    drawing["down"] = False
                    return
                if drawing["down"] or e.type == "mousedown":
                    canvas.paint(e.image_x, e.image_y, int(brush.value or 0), max(0, int(radius.value or 0)))
                    pad.set_source(data_url(canvas.render()))

            pad = ui.interactive_image(data_url(canvas.render()), on_mouse=on_mouse, cross=True,
                                       events=["mousedown", "mousemove", "mouseup", "mouseleave"]
                                       ).classes("app-mask-canvas").style("width: 256px")

            def clear():
                canvas.clear()
                pad.set_source(data_url(canvas.render()))
            ui.button("clear", on_click=clear).props("flat")

        def read():
            uploads.pop(f.name, None)
            if source.value == "upload":
                if f.name not in upload_state:
                    raise UserError("no mask uploaded: upload a class-id mask PNG, or choose another mask source")
                uploads[f.name] = upload_state[f.name]
            elif source.value == "draw":
                if not canvas.ids.any():
                    raise UserError("the drawn mask is empty: paint on the canvas, or choose another mask source")
                uploads[f.name] = canvas.save(session_dir() / f"drawn-mask-{int(time.time() * 1000)}.png")
        return read

    def controls(method: str, uploads: dict, error_label):
        """One control per page field of the method's settings; returns the function reading them."""
        readers = []
        for f, kind in page_fields(specs[method]):
            meta = f.metadata
            label = meta.get("label") or f.name.replace("_", " ")
            default = f.default if f.default is not dataclasses.MISSING else None
            css = f"app-{method}-{f.name}"
            if meta.get("kind") == "mask":
                readers.append((f, kind, None, mask_control(method, f, uploads, error_label)))
                continue
            if meta.get("kind") in ("image", "images"):
                state: dict = {}
                upload_box(label, state, f.name, error_label)

                def read_upload(name=f.name, state=state):
                    uploads.pop(name, None)
                    if name in state:
                        uploads[name] = state[name]
                readers.append((f, kind, None, read_upload))
                continue
            if kind is bool:
                widget = ui.switch(label, value=bool(default)).classes(css)
            elif meta.get("choices") is not None:
                options = {c: c for c in meta["choices"]}
                if default is None:
                    options = {"": "method default", **options}  # "" reads back as None: the method's default
                widget = ui.select(options, value="" if default is None else default, label=label).classes(
                    f"{css} w-48")
            elif kind in (int, float):  # an empty field (no default of its own) says whose default applies
                widget = ui.number(label if default is not None else f"{label} (empty: checkpoint's)",
                                   value=default, format="%d" if kind is int else None).classes(
                    f"{css} w-64" if default is None else f"{css} w-40")
            else:
                widget = ui.input(label, value=default or "").classes(f"{css} w-48")
            if meta.get("help"):
                widget.tooltip(meta["help"])
            readers.append((f, kind, widget, None))

        def read() -> dict:
            options = {}
            for f, kind, widget, custom in readers:
                if custom is not None:
                    custom()
                else:
                    options[f.name] = read_control(f, kind, widget.value)
            return options
        return read

    def method_tab(method: str) -> None:
        spec = specs[method]
        uploads: dict = {}
        defaults = sampling_defaults(method)
        with ui.row().classes("w-full items-start no-wrap"):
            with ui.column().classes("w-96"):
                prompt = ui.textarea("prompt (one per line; cycled over the images)",
                                     value="a red handwritten seven").props("autogrow").classes(
                    f"app-prompt-{method} w-full")
                with ui.row().classes("items-center w-full no-wrap"):
                    button = ui.button(f"Generate with {spec.label}").classes(f"app-generate-{method}")
                    status = ui.label("").classes(f"app-status-{method} text-caption")
                error_label = ui.label("").classes(f"app-error app-error-{method}")
                with ui.row().classes("items-end"):
                    sampling = {
                        "sampler": ui.select({"ddim": "ddim", "ddpm": "ddpm"}, value=defaults["sampler"],
                                             label="sampler").classes(f"app-sampler-{method} w-24"),
                        "eta": ui.number("eta (DDIM)", value=defaults["eta"], step=0.1, min=0, max=1).classes(
                            f"app-eta-{method} w-24"),
                        "guidance_scale": ui.number("guidance scale", value=defaults["guidance_scale"], step=0.5,
                                                    min=0).classes(f"app-guidance-{method} w-28"),
                    }
                ui.label(f"{spec.label}'s defaults: {defaults['sampler']}, eta {defaults['eta']:g}, guidance "
                         f"{defaults['guidance_scale']:g}").classes(f"app-defaults-{method} text-caption")
                collect = controls(method, uploads, error_label)
                ui.label(f"checkpoint: {display_path(checkpoints[method])}").classes("text-caption")
            with ui.column().classes("grow"):
                gallery = ui.row().classes(f"app-images-{method} pixelated")
                texts = ui.column().classes(f"app-texts-{method}")
                used_masks = ui.column().classes(f"app-masks-{method} pixelated")
                maps = ui.column().classes(f"app-influence-{method} pixelated")
                with ui.row():
                    grid_button = ui.button("Download grid (PNG)").classes(f"app-download-grid-{method}")
                    settings_button = ui.button("Download settings (JSON)").classes(
                        f"app-download-settings-{method}")
                grid_button.disable()
                settings_button.disable()
        last: dict = {}
        grid_button.on_click(lambda: last.get("grid") and ui.download.file(last["grid"]))
        settings_button.on_click(lambda: last.get("settings") and ui.download.file(last["settings"]))

        def fail(message: str) -> None:
            error_label.set_text(f"error: {message}")
            status.set_text("")
            ui.notify(message, type="negative")

        async def generate() -> None:
            error_label.set_text("")
            try:
                job = Job(method, prompt.value or "", shared_values(sampling), collect(), dict(uploads),
                          checkpoints[method])
            except (UserError, ValueError) as err:
                fail(one_line(str(err)))
                return
            if not JOB_LOCK.acquire(blocking=False):
                fail("another generation is running: wait for it to finish")
                return
            button.disable()
            key = (spec.name, str(checkpoints[method]))
            status.set_text(loading_message(spec, checkpoints[method]) + "..." if key not in _PIPELINES
                            else "starting...")
            active["status"] = status
            try:
                out_dir = session_dir() / f"{method}-{int(time.time() * 1000)}"
                result = await run.io_bound(run_tracked, job, out_dir, config.checkpoint_root)
            except UserError as err:
                fail(one_line(str(err)))
                return
            except Exception as err:  # a bug, not bad input: keep the server up and say what happened
                traceback.print_exc()
                fail(f"internal error ({type(err).__name__}: {one_line(str(err))}); see the server log")
                return
            finally:
                active.pop("status", None)
                JOB_LOCK.release()
                button.enable()
                progress_bar.set_value(0)
                progress_label.set_text("idle")
            if result is None:  # the server is shutting down
                return
            gallery.clear()
            texts.clear()
            used_masks.clear()
            maps.clear()
            with gallery:
                for image, text in zip(result.images if result.images is not None else [], result.prompts):
                    with ui.column().classes("items-center gap-0"):
                        ui.image(data_url(image)).props("no-spinner no-transition").classes(
                            f"app-image app-image-{method} w-32 h-32")
                        ui.label(text).classes("text-caption")
            with texts:
                for text, source in zip(result.texts or [], result.prompts):
                    ui.label(f"{source + ' -> ' if source else ''}{text}").classes(f"app-text app-text-{method}")
            with used_masks:
                if result.masks:
                    ui.label("the mask each image was conditioned on").classes("text-subtitle2")
                    with ui.row():
                        for index, mask in enumerate(result.masks):
                            with ui.column().classes("items-center gap-0"):
                                ui.image(data_url(mask)).props("no-spinner no-transition").classes(
                                    f"app-mask-used app-mask-used-{method} w-24 h-24")
                                ui.label(f"mask of image {index + 1}").classes("text-caption")
            with maps:
                if result.influence:
                    ui.label("influence maps of image 1 over the sampling steps (each tile: its step and model "
                             "timestep; scale: black = weight 0, white = weight 1)").classes("text-subtitle2")
                for name, grid in result.influence.items():
                    ui.label(f"{name} model").classes("text-caption")
                    ui.image(data_url(grid)).props("no-spinner no-transition").classes(
                        f"app-influence-map app-influence-{name}").style(f"width: {grid.width}px")
            last.clear()
            if result.grid_path is not None:
                last["grid"] = result.grid_path
                grid_button.enable()
            else:
                grid_button.disable()
            last["settings"] = result.settings_path
            settings_button.enable()
            count = len(result.texts) if result.texts is not None else len(result.images)
            kind = "captions" if result.texts is not None else "images"
            sampler_used = result.settings["settings"].get("sampler", "ddim")
            loaded = f"; model loaded in {result.load_seconds:.1f} s" if result.load_seconds >= 0.05 else ""
            status.set_text(f"{count} {kind} in {result.seconds:.1f} s (seed {job.shared.seed}, "
                            f"{job.shared.steps} {sampler_used} steps{loaded})")

        button.on_click(generate)

    with ui.tabs().classes("w-full") as tabs:
        tab = {m: ui.tab(m, label=specs[m].label).classes(f"app-tab-{m}") for m in names}
    with ui.tab_panels(tabs, value=tab[names[0]]).classes("w-full"):
        for m in names:
            with ui.tab_panel(tab[m]):
                method_tab(m)


class UploadLimit:
    """ASGI middleware bounding upload requests (POST to an ``/upload/`` path) by the bytes actually received.

    A declared ``Content-Length`` above the limit is refused at once; otherwise the body is read here, counted
    chunk by chunk, and refused with 413 as soon as it passes the limit, so a chunked upload without a length (or
    with a false one) is never taken in whole. A body within the limit is handed to the page unchanged. The limit
    adds 64 KiB to ``max_bytes`` for the multipart form around the file.
    """

    def __init__(self, app, max_bytes: int, drain_bytes: int = 64 * 2**20) -> None:
        self.app, self.limit, self.drain_bytes = app, max_bytes + 64 * 1024, drain_bytes
        self.max_bytes = max_bytes

    async def _refuse(self, send) -> None:
        body = json.dumps({"detail": f"upload larger than the {self.max_bytes / 2**20:g} MB limit"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or "/upload/" not in scope.get("path", ""):
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            await self._refuse(send)
            return
        chunks, received, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            received += len(chunk)
            more = message.get("more_body", False)
            if received > self.limit:
                await self._refuse(send)
                # Read (and drop) a bounded tail so that the client, still sending, gets to read the 413.
                drained = 0
                while more and drained < self.drain_bytes:
                    message = await receive()
                    drained += len(message.get("body", b""))
                    more = message.get("type") == "http.request" and message.get("more_body", False)
                return
            chunks.append(chunk)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def add_upload_guard(app, max_bytes: int) -> None:
    """Bound every upload request of ``app`` by :class:`UploadLimit`."""
    app.add_middleware(UploadLimit, max_bytes=max_bytes)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--checkpoint_root", default=None,
                   help="a folder laid out like ckpt/tiny (contextdiff/, shifted/, codiff/, sdg/, "
                        "versatile/pipeline/); default: the shipped tiny checkpoints")
    for m in page_methods():
        p.add_argument(f"--{m}_checkpoint", default=None,
                       help=f"{methods.get(m).label} checkpoint folder (wins over --checkpoint_root)")
    p.add_argument("--max_upload_mb", type=float, default=DEFAULT_MAX_UPLOAD_MB,
                   help=f"largest accepted upload in MB (default {DEFAULT_MAX_UPLOAD_MB:g})")
    p.add_argument("--work_dir", default=None, help="where generated grids and settings are kept (default: a "
                                                    "temporary folder)")
    return p


def main(argv=None) -> int:
    import os

    os.environ.setdefault("NICEGUI_STORAGE_PATH", str(Path(tempfile.gettempdir()) / "dlab-app-storage"))
    args = build_parser().parse_args(argv)
    if not 0 < args.max_upload_mb <= 1024:
        print(f"error: --max_upload_mb must lie in (0, 1024], got {args.max_upload_mb:g}", file=sys.stderr)
        return 2
    if not 0 < args.port < 65536:
        print(f"error: --port must lie in 1..65535, got {args.port}", file=sys.stderr)
        return 2
    for m in page_methods():
        folder = getattr(args, f"{m}_checkpoint") or default_checkpoint(m, args.checkpoint_root)
        if not Path(folder).is_dir():
            print(f"warning: {methods.get(m).label} checkpoint {folder} does not exist: its tab will report it",
                  file=sys.stderr)
    if args.work_dir:
        Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    from nicegui import app, ui

    add_upload_guard(app, int(args.max_upload_mb * 2**20))
    print(f"diffusion-lab app on http://{args.host}:{args.port}", flush=True)
    ui.run(lambda: build_page(args), host=args.host, port=args.port, title="diffusion-lab", reload=False,
           show=False, show_welcome_message=False, favicon="🧪", uvicorn_logging_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
