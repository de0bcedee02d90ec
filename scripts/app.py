"""A local web page to try every method side by side (NiceGUI): one tab per method, one shared seed/steps panel.

    python scripts/app.py                                   # http://127.0.0.1:7860, the shipped tiny checkpoints
    python scripts/app.py --host 0.0.0.0 --port 8080 --checkpoint_root /models/dlab --max_upload_mb 5
    python scripts/app.py --shifted_checkpoint out/shifted  # one method's own folder

Every image goes through the code of ``scripts/sample.py`` (its parser, defaults and ``generate_images``): the same
seed and settings give the same images, and the settings JSON offered for download holds the ``scripts/sample.py``
command that reproduces the grid. Versatile's text-output flows (i2t, tv) go through ``scripts/versatile/sample.py``
the same way. The page is served on 127.0.0.1 unless ``--host`` says otherwise; it fetches nothing from the internet.
Uploads must be images (PNG, JPEG, BMP, GIF, WebP, TIFF) no larger than ``--max_upload_mb``: anything else is
refused with a message on the page (and over-long requests with HTTP 413 before they are read).

The module splits in two: the generation back end (``run_job``, ``check_upload``, ``Shared``: plain Python, tested
without a browser) and the page (``build_page``, NiceGUI imported only there).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import shlex
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional


REPO = Path(__file__).resolve().parent.parent
for _path in (REPO, REPO / "scripts"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import sample  # noqa: E402  (scripts/sample.py: the one generation entry)

from common.errors import UserError, one_line  # noqa: E402


METHODS = ("contextdiff", "shifted", "codiff", "sdg", "versatile")
LABELS = {"contextdiff": "ContextDiff", "shifted": "Shifted Diffusion", "codiff": "Collaborative Diffusion",
          "sdg": "SDG", "versatile": "Versatile Diffusion"}
MAX_STEPS = 1000  # the training schedules have 1000 steps: a plan cannot be longer
MAX_IMAGES = 16
DEFAULT_MAX_UPLOAD_MB = 8.0
MAX_UPLOAD_PIXELS = 4096 * 4096
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")
VERSATILE_FLOWS = ("t2i", "iv", "i2t", "tv", "dual")
TEXT_FLOWS = ("i2t", "tv")
CONTEXTDIFF_SCHEDULES = ("quadratic", "prior")


# ------------------------------------------------------------------------------------------------------ back end


@dataclass
class Shared:
    """The shared panel: the common flags of ``scripts/sample.py``. ``sampler="default"`` / ``eta=None`` /
    ``guidance_scale=None`` leave the flag out, so the method's own default applies (``SAMPLE_DEFAULTS`` of its
    ``sample_cli``: SDG samples DDPM without CFG, CoDiff DDIM with eta 1), exactly as on the command line."""

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


@dataclass
class Job:
    """One click of a tab's Generate button. ``options``: the tab's controls (keys as in ``controls_to_flags``);
    ``uploads``: control name -> path of a checked image saved by the page."""

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
    module = sample.method_module(method)
    default = Path(module.DEFAULT_CHECKPOINT)
    if checkpoint_root:
        return str(Path(checkpoint_root) / default.relative_to("ckpt/tiny"))
    return str(REPO / default)


def prompt_lines(text: str) -> list:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def _label_prompt(job: Job) -> Optional[str]:
    """The label used when the prompt only names the outputs (no text condition), else None (a prompt is needed)."""
    o = job.options
    if job.method == "sdg" and not float(o.get("text_weight", 0) or 0):
        return "sdg sample"
    if job.method == "versatile" and o.get("flow") in ("iv", "i2t"):
        return "image variation" if o.get("flow") == "iv" else "caption"
    return None


def controls_to_flags(job: Job) -> list:
    """The tab's controls as ``scripts/sample.py`` method flags."""
    o, up, m = job.options, job.uploads, job.method
    flags: list = []
    if m == "contextdiff":
        flags += ["--k_schedule", o.get("k_schedule", "quadratic") if o.get("shift", True) else "none"]
    elif m == "shifted":
        flags += ["--prior_guidance", repr(float(o.get("prior_guidance", 1.0))),
                  "--prior_variant", "shifted" if o.get("bank", True) else "baseline",
                  "--prior_respacing", str(o.get("prior_respacing", "8"))]
    elif m == "codiff":
        flags += ["--weighting", o.get("weighting", "collaborative")]
        if up.get("mask"):
            flags += ["--mask_path", str(up["mask"])]
    elif m == "sdg":
        flags += ["--text_weight", repr(float(o.get("text_weight", 1000.0))),
                  "--image_weight", repr(float(o.get("image_weight", 0.0))),
                  "--image_loss", o.get("image_loss", "semantic")]
        if up.get("reference"):
            flags += ["--data_dir", str(up["reference"])]
    elif m == "versatile":
        flags += ["--flow", o.get("flow", "t2i")]
        if up.get("image"):
            flags += ["--image", str(up["image"])]
        if o.get("flow") == "dual":
            flags += ["--mix_ratio", repr(float(o.get("mix_ratio", 0.5)))]
    return flags


def sample_argv(job: Job, prompts: list) -> list:
    """The ``scripts/sample.py`` command line of a job (without ``--output_dir``)."""
    s = job.shared
    argv = ["--method", job.method, "--pretrained_model_name_or_path", str(job.checkpoint)]
    for p in dict.fromkeys(prompts):
        argv += ["--prompt", p]
    argv += ["--num_images", str(s.num_images), "--steps", str(s.steps), "--seed", str(s.seed)]
    if s.sampler != "default":
        argv += ["--sampler", s.sampler]
    if s.eta is not None:
        argv += ["--eta", repr(s.eta)]
    if s.guidance_scale is not None:
        argv += ["--guidance_scale", repr(s.guidance_scale)]
    return argv + controls_to_flags(job)


def versatile_text_argv(job: Job, prompts: list) -> list:
    """The ``scripts/versatile/sample.py`` command line of an i2t / tv job."""
    s, o = job.shared, job.options
    argv = ["--flow", o["flow"], "--checkpoint", str(job.checkpoint), "--num_samples", str(s.num_images),
            "--steps", str(s.steps), "--seed", str(s.seed)]
    if s.guidance_scale is not None:
        argv += ["--scale", repr(s.guidance_scale)]
    if s.eta is not None:
        argv += ["--eta", repr(s.eta)]
    if o["flow"] == "tv":
        for p in prompts:
            argv += ["--prompt", p]
    if job.uploads.get("image"):
        argv += ["--image", str(job.uploads["image"])]
    return argv


def _parse(parse: Callable, argv: list):
    """argparse on a generated command line: its exit becomes a UserError with argparse's own message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parse(argv)
    except SystemExit:
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        raise UserError(lines[-1] if lines else "invalid settings") from None


def _versatile_script():
    """The command line of ``scripts/versatile/sample.py`` (its parser, checks and flow runner)."""
    from versatile import flows_cli

    return flows_cli


def _influence_grids(gen, upscale: int = 4) -> dict:
    """modality -> grid of the influence maps of sample 0 at every step (white = weight 1), as the released
    ``--return_influence_function`` draws them."""
    import torch

    from common.io import make_image_grid

    out = {}
    for m, name in enumerate(gen.modalities):
        maps = gen.influence[:, 0, m:m + 1].float()  # [S, 1, h, w]
        maps = torch.nn.functional.interpolate(maps, scale_factor=upscale, mode="nearest")
        out[name] = make_image_grid(maps, nrow=10, value_range=(0.0, 1.0))
    return out


def run_job(job: Job, output_dir, checkpoint_root: Optional[str] = None) -> Result:
    """Generate for one job through ``scripts/sample.py``'s code; write ``grid.png`` (image output) and
    ``settings.json`` to ``output_dir``. Bad input is a UserError with a one-line message."""
    from common.io import save_image_grid

    start = time.perf_counter()
    if job.method not in METHODS:
        raise UserError(f"unknown method {job.method!r}: choose one of {', '.join(METHODS)}")
    job.checkpoint = job.checkpoint or default_checkpoint(job.method, checkpoint_root)
    prompts = prompt_lines(job.prompt)
    if not prompts:
        label = _label_prompt(job)
        if label is None:
            raise UserError("the prompt is empty: write what to generate (one prompt per line)")
        prompts = [label]
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    images = texts = None
    influence: dict = {}
    flow = job.options.get("flow", "t2i")
    if job.method == "versatile" and flow not in VERSATILE_FLOWS:
        raise UserError(f"flow {flow!r}: choose one of {', '.join(VERSATILE_FLOWS)}")
    if job.method == "versatile" and flow in TEXT_FLOWS:
        script = _versatile_script()
        argv = versatile_text_argv(job, prompts)
        args = _parse(script.build_parser().parse_args, argv)
        vflow, paths = script.check_args(args)
        from versatile.checkpoint import check_flow, load_pipeline

        pipe, manifest = load_pipeline(Path(args.checkpoint), args.device)
        check_flow(manifest, vflow)
        out, sources = script.run_flow(pipe, vflow, args.prompt or [], paths, args)
        texts = list(out.texts)
        command = ["python", "scripts/versatile/sample.py", *argv]
        prompts = [s.get("prompt", "") for s in sources]
    else:
        argv = sample_argv(job, prompts)
        args, module = _parse(sample.parse_args, argv)
        sample.check_args(args)
        prompts = sample.read_prompts(args)
        record = job.method == "codiff" and args.weighting == "collaborative"
        if record:  # the same run as generate_images, keeping the influence maps of every step
            gen = module.generate_collaboration(args, prompts, record=True)
            images = gen.images.cpu()
            influence = _influence_grids(gen)
        else:
            images = sample.generate_images(args, module, prompts)
        command = ["python", "scripts/sample.py", *argv]
    settings = {
        "method": job.method, "prompt": job.prompt, "controls": job.options,
        "uploads": {k: str(v) for k, v in job.uploads.items()}, **asdict(job.shared),
        "checkpoint": str(job.checkpoint), "command": shlex.join(command),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    grid_path = None
    if images is not None:
        grid_path = output_dir / "grid.png"
        save_image_grid(images, grid_path, nrow=min(8, len(images)), value_range=(0, 1))
        settings["outputs"] = {"grid": "grid.png", "prompts": prompts}
    else:
        settings["outputs"] = {"texts": texts, "sources": prompts}
    settings_path = output_dir / "settings.json"
    settings_path.write_text(json.dumps(settings, indent=2, default=str) + "\n")
    return Result(images=images, texts=texts, prompts=prompts, settings=settings, grid_path=grid_path,
                  settings_path=settings_path, influence=influence, seconds=time.perf_counter() - start)


class Progress:
    """Sampler progress for the page: ``common.samplers`` iterates its steps through ``tqdm``; while a job runs,
    that name is swapped for a counter that records (description, step, total) here."""

    def __init__(self):
        self.lock = threading.Lock()
        self.desc, self.n, self.total, self.running = "", 0, 0, False

    def report(self, desc, n, total):
        with self.lock:
            self.desc, self.n, self.total = desc or "sampling", n, total

    def snapshot(self):
        with self.lock:
            return self.desc, self.n, self.total, self.running

    @contextlib.contextmanager
    def tap(self):
        import common.samplers as samplers

        state = self

        class Counter:
            def __init__(self, iterable=None, desc=None, total=None, **_):
                self.iterable, self.desc = iterable, desc
                self.total = total if total is not None else len(iterable)

            def __iter__(self):
                for i, item in enumerate(self.iterable):
                    state.report(self.desc, i, self.total)
                    yield item
                state.report(self.desc, self.total, self.total)

        original = samplers.tqdm
        samplers.tqdm = Counter
        with self.lock:
            self.running, self.desc, self.n, self.total = True, "loading", 0, 0
        try:
            yield self
        finally:
            samplers.tqdm = original
            with self.lock:
                self.running = False


PROGRESS = Progress()
JOB_LOCK = threading.Lock()  # one generation at a time (CPU machines; the progress tap is process-wide)


def run_tracked(job: Job, output_dir, checkpoint_root=None) -> Result:
    with PROGRESS.tap():
        return run_job(job, output_dir, checkpoint_root)


# ---------------------------------------------------------------------------------------------------------- page


def data_url(image) -> str:
    """A PIL image or ``[3, H, W]`` tensor in [0, 1] as a PNG data URL."""
    from common.io import to_pil

    buffer = io.BytesIO()
    to_pil(image, value_range=(0, 1)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def method_defaults() -> str:
    """Each method's defaults for the shared sampling flags, as scripts/sample.py resolves them."""
    parts = []
    for m in METHODS:
        args, _ = sample.parse_args(["--method", m, "--prompt", "x"])
        parts.append(f"{LABELS[m]} {args.sampler}, eta {args.eta:g}, guidance {args.guidance_scale:g}")
    return "; ".join(parts)


def codiff_mask_format(checkpoint: str):
    """The mask format of a collaboration folder's mask member (size and classes for the drawing canvas), or None."""
    from codiff.conditions import MaskFormat

    try:
        folder = Path(checkpoint)
        config = json.loads((folder / "codiff.json").read_text())
        for member in config.get("members", {}).values():
            member_dir = folder / member
            meta = json.loads((member_dir / "codiff_member.json").read_text())
            if meta.get("kind") == "mask":
                encoder = json.loads((member_dir / meta.get("mask_encoder", "mask_encoder") / "config.json")
                                     .read_text())
                return MaskFormat.from_config(encoder["format"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return None


class MaskCanvas:
    """A class-id mask painted with the mouse (codiff): ``ids`` ``[H, W]`` uint8, shown ``scale`` x larger."""

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
    """The page: shared panel, one tab per method, outputs, progress, downloads. Runs once per browser visit."""
    from nicegui import run, ui

    limit = int(config.max_upload_mb * 2**20)
    folder: list[Path] = []

    def session_dir() -> Path:
        """This visit's folder for grids, settings and uploads: made on first use (a bare GET of the page, as a
        health check does, leaves nothing behind) and removed when NiceGUI deletes the client (tab closed past
        the reconnect timeout), so a long-running server does not fill the disk."""
        if not folder:
            folder.append(Path(tempfile.mkdtemp(prefix="dlab-app-", dir=config.work_dir)))
        return folder[0]

    ui.context.client.on_delete(lambda: [shutil.rmtree(f, ignore_errors=True) for f in folder])
    checkpoints = {m: getattr(config, f"{m}_checkpoint") or default_checkpoint(m, config.checkpoint_root)
                   for m in METHODS}
    ui.add_css(".pixelated img { image-rendering: pixelated; } .app-error { color: #c10015; font-weight: 600; }")

    ui.label("diffusion-lab: every method side by side").classes("text-h5")
    with ui.card().classes("w-full"):
        ui.label("Shared settings").classes("text-subtitle1")
        with ui.row().classes("items-end"):
            seed = ui.number("seed", value=0, format="%d").classes("app-seed w-28")
            steps = ui.number("steps", value=25, format="%d",
                              validation={f"1 to {MAX_STEPS}": lambda v: v is not None and 1 <= v <= MAX_STEPS}
                              ).classes("app-steps w-28")
            sampler_select = ui.select({"default": "method default", "ddim": "ddim", "ddpm": "ddpm"},
                                       value="default", label="sampler").classes("app-sampler w-36")
            eta = ui.number("eta (DDIM)", value=None, step=0.1, placeholder="method default").classes("app-eta w-32")
            guidance = ui.number("guidance scale", value=None, step=0.5, placeholder="method default"
                                 ).classes("app-guidance w-32")
            num_images = ui.number("images", value=4, format="%d",
                                   validation={f"1 to {MAX_IMAGES}": lambda v: v is not None
                                               and 1 <= v <= MAX_IMAGES}).classes("app-num-images w-28")
        ui.label("empty = each method's default (scripts/sample.py --method NAME): " + method_defaults()
                 ).classes("text-caption")
        with ui.row().classes("items-center w-full"):
            progress_bar = ui.linear_progress(value=0, show_value=False).classes("app-progress w-64")
            progress_label = ui.label("idle").classes("app-progress-label")

    def shared_values() -> Shared:
        return Shared.from_values(dict(seed=seed.value, steps=steps.value, sampler=sampler_select.value,
                                       eta=eta.value, guidance_scale=guidance.value, num_images=num_images.value))

    def tick() -> None:
        desc, n, total, running = PROGRESS.snapshot()
        if running:
            progress_bar.set_value(n / total if total else 0.0)
            progress_label.set_text(f"{desc}: step {n}/{total}" if total else f"{desc}...")

    ui.timer(0.25, tick)

    def upload_box(label: str, state: dict, key: str, error_label):
        """An image upload checked on the server (type, size) and also refused by the browser above the limit."""
        info = ui.label("").classes(f"app-upload-info-{key}")

        async def on_upload(e):
            data = await e.file.read()
            try:
                image = check_upload(e.file.name, data, limit)
            except UserError as err:
                state.pop(key, None)
                info.set_text("")
                error_label.set_text(f"error: {one_line(str(err))}")
                ui.notify(one_line(str(err)), type="negative")
                e.sender.reset()
                return
            path = session_dir() / f"{key}-{int(time.time() * 1000)}.png"
            image.save(path, format="PNG")
            state[key] = path
            error_label.set_text("")
            info.set_text(f"{e.file.name}: {image.width}x{image.height} {image.mode}")

        def on_rejected():
            message = (f"upload refused: the file is larger than the {config.max_upload_mb:g} MB limit "
                       "(start the app with --max_upload_mb to raise it)")
            error_label.set_text(f"error: {message}")
            ui.notify(message, type="negative")

        return ui.upload(label=label, auto_upload=True, max_file_size=limit, on_upload=on_upload,
                         on_rejected=on_rejected).classes(f"app-upload-{key}").props("flat bordered")

    def method_tab(method: str, controls: Callable[[dict, Any], Callable[[], dict]]) -> None:
        uploads: dict = {}
        with ui.row().classes("w-full items-start no-wrap"):
            with ui.column().classes("w-96"):
                prompt = ui.textarea("prompt (one per line; cycled over the images)",
                                     value="a red handwritten seven").classes(f"app-prompt-{method} w-full")
                error_label = ui.label("").classes(f"app-error app-error-{method}")
                collect = controls(uploads, error_label)
                ui.label(f"checkpoint: {checkpoints[method]}").classes("text-caption")
                button = ui.button(f"Generate with {LABELS[method]}").classes(f"app-generate-{method}")
            with ui.column().classes("grow"):
                status = ui.label("").classes(f"app-status-{method}")
                gallery = ui.row().classes(f"app-images-{method} pixelated")
                texts = ui.column().classes(f"app-texts-{method}")
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
                job = Job(method, prompt.value or "", shared_values(), collect(), dict(uploads), checkpoints[method])
            except UserError as err:
                fail(one_line(str(err)))
                return
            if not JOB_LOCK.acquire(blocking=False):
                fail("another generation is running: wait for it to finish")
                return
            button.disable()
            status.set_text("generating...")
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
                JOB_LOCK.release()
                button.enable()
                progress_bar.set_value(0)
                progress_label.set_text("idle")
            if result is None:  # the server is shutting down
                return
            gallery.clear()
            texts.clear()
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
            with maps:
                if result.influence:
                    ui.label("influence maps of sample 1 over the steps (left to right, white = weight 1)")
                for name, grid in result.influence.items():
                    ui.label(name).classes("text-caption")
                    ui.image(data_url(grid)).props("no-spinner no-transition").classes(
                        f"app-influence-map app-influence-{name}").style(f"width: {grid.width * 2}px")
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
            sampler_used = result.settings["args"].get("sampler", "ddim")
            status.set_text(f"{count} {kind} in {result.seconds:.1f} s (seed {job.shared.seed}, "
                            f"{job.shared.steps} {sampler_used} steps)")

        button.on_click(generate)

    # ---- the controls of each method: build the widgets, return a function reading them into Job.options

    def contextdiff_controls(uploads, error_label):
        shift = ui.switch("contextual shift (k_t schedule on)", value=True).classes("app-cd-shift")
        schedule = ui.select(list(CONTEXTDIFF_SCHEDULES), value="quadratic", label="k_t schedule").classes("w-40")
        schedule.bind_enabled_from(shift, "value")
        return lambda: {"shift": bool(shift.value), "k_schedule": schedule.value}

    def shifted_controls(uploads, error_label):
        prior_guidance = ui.number("prior guidance", value=1.0, step=0.5).classes("w-40")
        bank = ui.switch("Gaussian bank (shifted prior; off = the unshifted baseline prior)", value=True)
        respacing = ui.input("prior steps (respacing)", value="8").classes("w-40")

        def read():
            if prior_guidance.value is None:
                raise UserError("prior guidance is empty: enter a number (1 = the reference's value)")
            return {"prior_guidance": float(prior_guidance.value), "bank": bool(bank.value),
                    "prior_respacing": (respacing.value or "").strip() or "8"}
        return read

    def codiff_controls(uploads, error_label):
        fmt = codiff_mask_format(checkpoints["codiff"])
        size = fmt.image_size if fmt is not None and fmt.image_size else (32, 32)
        classes = list(fmt.class_names) if fmt is not None else ["background", "stroke"]
        palette = list(fmt.palette) if fmt is not None else [(0, 0, 0), (255, 255, 255)]
        weighting = ui.select(["collaborative", "average", "mask_only", "text_only"], value="collaborative",
                              label="weighting").classes("w-48")
        source = ui.radio({"digit": "test mask of the prompt's digit", "upload": "upload a mask",
                           "draw": "draw a mask"}, value="digit").props("inline").classes("app-mask-source")
        upload_state: dict = {}
        with ui.column().bind_visibility_from(source, "value", value="upload"):
            upload_box("mask (class-id PNG, palette colours or grey levels = ids)", upload_state, "mask",
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
            uploads.pop("mask", None)
            if source.value == "upload":
                if "mask" not in upload_state:
                    raise UserError("no mask uploaded: upload a class-id mask PNG, or choose another mask source")
                uploads["mask"] = upload_state["mask"]
            elif source.value == "draw":
                if not canvas.ids.any():
                    raise UserError("the drawn mask is empty: paint on the canvas, or choose another mask source")
                uploads["mask"] = canvas.save(session_dir() / f"drawn-mask-{int(time.time() * 1000)}.png")
            return {"weighting": weighting.value, "mask_source": source.value}
        return read

    def sdg_controls(uploads, error_label):
        with ui.row():
            text_weight = ui.number("language weight", value=1000.0, step=100).classes("w-36")
            image_weight = ui.number("image weight", value=0.0, step=100).classes("w-36")
        image_loss = ui.select({"semantic": "image content (semantic)", "style": "image style (Gram)"},
                               value="semantic", label="image score").classes("w-56")
        upload_state: dict = {}
        upload_box("reference image (for the image score)", upload_state, "reference", error_label)

        def read():
            if text_weight.value is None or image_weight.value is None:
                raise UserError("a guidance weight is empty: enter a number (0 = off)")
            uploads.pop("reference", None)
            if "reference" in upload_state:
                uploads["reference"] = upload_state["reference"]
            return {"text_weight": float(text_weight.value), "image_weight": float(image_weight.value),
                    "image_loss": image_loss.value}
        return read

    def versatile_controls(uploads, error_label):
        flow = ui.select({"t2i": "text to image", "iv": "image variation", "i2t": "image to text",
                          "tv": "text variation", "dual": "dual (text + image)"}, value="t2i",
                         label="flow").classes("app-vd-flow w-56")
        mix = ui.slider(min=0.0, max=1.0, step=0.05, value=0.5).props("label-always").classes("w-56")
        mix.bind_visibility_from(flow, "value", value="dual")
        ui.label("mix ratio: the text weight of dual").bind_visibility_from(flow, "value", value="dual")
        upload_state: dict = {}
        upload_box("image (iv, i2t, dual)", upload_state, "image", error_label)

        def read():
            uploads.pop("image", None)
            if flow.value in ("iv", "i2t", "dual"):
                if "image" not in upload_state:
                    raise UserError(f"flow {flow.value} needs an image: upload one")
                uploads["image"] = upload_state["image"]
            return {"flow": flow.value, "mix_ratio": float(mix.value)}
        return read

    builders = {"contextdiff": contextdiff_controls, "shifted": shifted_controls, "codiff": codiff_controls,
                "sdg": sdg_controls, "versatile": versatile_controls}
    with ui.tabs().classes("w-full") as tabs:
        tab = {m: ui.tab(m, label=LABELS[m]).classes(f"app-tab-{m}") for m in METHODS}
    with ui.tab_panels(tabs, value=tab[METHODS[0]]).classes("w-full"):
        for m in METHODS:
            with ui.tab_panel(tab[m]):
                method_tab(m, builders[m])


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
    for m in METHODS:
        p.add_argument(f"--{m}_checkpoint", default=None, help=f"{LABELS[m]} checkpoint folder (wins over "
                                                                "--checkpoint_root)")
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
    for m in METHODS:
        folder = getattr(args, f"{m}_checkpoint") or default_checkpoint(m, args.checkpoint_root)
        if not Path(folder).is_dir():
            print(f"warning: {LABELS[m]} checkpoint {folder} does not exist: its tab will report it", file=sys.stderr)
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
