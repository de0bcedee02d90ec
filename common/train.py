"""One accelerate training loop for every training script in the project.

A method supplies its trainable modules, a ``loss_fn(batch, ctx) -> scalar tensor`` and a dataset; the loop
supplies everything diffusers' ``train_text_to_image.py`` re-forks per script: mixed precision, gradient
accumulation, gradient checkpointing, EMA, LR schedules, clipping, AdamW / 8-bit Adam, tracker logging,
validation grids, tqdm, atomic rotating checkpoints, exact ``--resume_from_checkpoint latest`` and a clean
shutdown on SIGTERM/SIGINT.

Usage (a method script)::

    parser = argparse.ArgumentParser()
    add_train_args(parser, defaults={"learning_rate": 1e-4, "tracker_project_name": "contextdiff"})
    parser.add_argument("--pretrained_model_name_or_path", required=True)
    args = parse_args_with_config(parser)             # --config configs/x/tiny.yaml; CLI flags win
    config = config_from_args(args)                   # validated TrainConfig (UserError on bad flags)

    with Trainer(config) as trainer:                  # Accelerator, seed, trackers; closes the process group
        unet = UNet2DConditionModel.from_pretrained(args.pretrained_model_name_or_path, subfolder="unet")
        vae = AutoencoderKL.from_pretrained(args.pretrained_model_name_or_path, subfolder="vae")

        def loss_fn(batch, ctx):                      # ctx.models holds the *prepared* (DDP-wrapped) modules
            latents = ctx.models["vae"].encode(batch["pixels"].to(ctx.weight_dtype)).latent_dist.sample()
            noise = torch.randn_like(latents)
            t = torch.randint(0, 1000, (latents.shape[0],), device=latents.device)
            pred = ctx.models["unet"](schedule.add_noise(latents, noise, t), t, batch["text"]).sample
            return F.mse_loss(pred.float(), noise.float())

        result = trainer.fit({"unet": unet}, loss_fn, dataset, frozen={"vae": vae}, validation_fn=validate)
        if trainer.is_main_process and result.completed:
            result.models["unet"].save_pretrained(os.path.join(config.output_dir, "unet"))  # EMA weights
    raise SystemExit(result.exit_code)                # 0 done; 143/130 stopped by SIGTERM/SIGINT (resumable)

Exact resume. A checkpoint is ``accelerator.save_state`` (models, optimizer, LR scheduler, GradScaler, the EMA
via ``register_for_checkpointing``, per-process torch/numpy/python RNG states) plus ``trainer_state.json``. The
data order is a pure function of ``(seed, epoch)`` (accelerate's seedable sampler, ``set_epoch`` every epoch),
and a resumed run skips the batches of the current epoch already consumed (``skip_first_batches``). Two
things would otherwise make a resumed run drift from an uninterrupted one even with all states restored, and
the loop removes both:

- a ``DataLoader`` draws its worker base seed from the *global* torch RNG each time an iterator is created,
  and accelerate fetches one batch ahead, so data loading (and random augmentations in the main process) would
  consume the training RNG at different moments in a straight and a resumed run. The loader gets its own
  generator (re-seeded every epoch) and every batch fetch runs in its own RNG scope seeded from
  ``(seed, epoch, fetch index)``: the training RNG (dropout, noise, timesteps drawn in ``loss_fn``) sees only steps;
- validation runs in an RNG scope seeded from ``seed`` (the same noise at every validation, so the grids are
  comparable across steps), so whether or not a validation happened never changes training randomness.

With those, the final weights of "N steps" and "N/2 steps, kill, resume to N" are bitwise equal on CPU
(``tests/test_train.py``). Not bit-exact: resuming with a different number of processes, batch size,
accumulation or seed (a warning says so); random augmentations that run in the main process see different
draws for the first two batches after a resume (accelerate fetches one batch ahead); worker processes
(``dataloader_num_workers > 0``) get per-epoch seeds, so augmentations in workers are reproducible run to run but
not across a mid-epoch resume. A dataset that seeds its augmentation from ``(seed, epoch, index)`` is exact always.

Shutdown. SIGTERM or SIGINT sets a flag; the loop finishes the current optimizer step, all processes agree on
the flag (it rides along with the loss all-gather), write a checkpoint and return with ``stop_reason`` set.
``TrainResult.exit_code`` is then ``128 + signal`` (143 for SIGTERM, 130 for SIGINT), the Unix convention, so a
pipeline (``make``, CI, ``&&``) does not treat an interrupted training as finished and go on to export or
evaluate; the checkpoint makes it resumable. A second SIGINT aborts at once (``KeyboardInterrupt``).

Multi-process: ``torchrun --nproc_per_node N script.py`` or ``accelerate launch [--cpu] --num_processes N``. On a
machine without GPU accelerate needs ``cpu=True`` to see the torchrun environment (else every process trains
alone, silently); the trainer passes it and refuses to run if WORLD_SIZE > 1 but accelerate found one process.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import re
import resource
import shutil
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    ProjectConfiguration,
    find_batch_size,
    set_seed,
)
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from common.errors import UserError


logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TMP_SUFFIX = ".tmp"
STATE_FILE = "trainer_state.json"
STATE_FORMAT = "diffusion-lab/trainer-checkpoint/v1"
SUMMARY_FILE = "train_summary.json"
MIXED_PRECISION_CHOICES = ("no", "fp16", "bf16")
REPORT_TO_CHOICES = ("tensorboard", "wandb", "all", "none")
# diffusers' SchedulerType minus piecewise_constant, which needs a rules string we do not expose.
LR_SCHEDULER_CHOICES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


# --------------------------------------------------------------------------------------------------------------
# Configuration: one dataclass, flags named as in diffusers' examples/text_to_image/train_text_to_image.py
# --------------------------------------------------------------------------------------------------------------


def _opt(default: Any, help: str, **argparse_kwargs: Any) -> Any:
    """A dataclass field that also carries its argparse help (and type/choices), so flags and fields never drift."""
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class TrainConfig:
    """Everything the loop needs; field names are diffusers' training-script flags so configs port over."""

    output_dir: str = _opt("outputs/train", "Where checkpoints, logs, validation grids and the summary go.", type=str)
    seed: int | None = _opt(
        0, "Seed for init, data order and noise; resume needs the same seed to be exact.", type=int
    )
    train_batch_size: int = _opt(16, "Batch size per process (per device).", type=int)
    num_train_epochs: int = _opt(100, "Epochs to train; ignored when --max_train_steps is set.", type=int)
    max_train_steps: int | None = _opt(None, "Optimizer steps to train; overrides --num_train_epochs.", type=int)
    gradient_accumulation_steps: int = _opt(1, "Batches accumulated per optimizer step.", type=int)
    gradient_checkpointing: bool = _opt(False, "Trade compute for memory (enable_gradient_checkpointing()).")
    learning_rate: float = _opt(1e-4, "Initial learning rate (after warmup).", type=float)
    scale_lr: bool = _opt(False, "Multiply the LR by batch size x accumulation x number of processes.")
    lr_scheduler: str = _opt("constant", "diffusers get_scheduler name.", type=str, choices=LR_SCHEDULER_CHOICES)
    lr_warmup_steps: int = _opt(500, "Warmup optimizer steps of the LR scheduler.", type=int)
    lr_num_cycles: int = _opt(1, "Hard restarts of cosine_with_restarts.", type=int)
    lr_power: float = _opt(1.0, "Power of the polynomial scheduler.", type=float)
    use_8bit_adam: bool = _opt(False, "bitsandbytes AdamW8bit instead of torch AdamW (needs bitsandbytes).")
    allow_tf32: bool = _opt(False, "Allow TF32 matmuls on Ampere+ GPUs (faster, slightly less exact).")
    use_ema: bool = _opt(False, "Keep an EMA of the trainable weights; validation and the returned models use it.")
    ema_decay: float = _opt(0.9999, "Maximum EMA decay (diffusers EMAModel warms up towards it).", type=float)
    foreach_ema: bool = _opt(False, "Update the EMA with torch._foreach ops (faster, more memory).")
    dataloader_num_workers: int = _opt(0, "DataLoader worker processes (0: load in the main process).", type=int)
    adam_beta1: float = _opt(0.9, "Adam beta1.", type=float)
    adam_beta2: float = _opt(0.999, "Adam beta2.", type=float)
    adam_weight_decay: float = _opt(1e-2, "AdamW decoupled weight decay.", type=float)
    adam_epsilon: float = _opt(1e-8, "Adam epsilon.", type=float)
    max_grad_norm: float = _opt(1.0, "Clip the global gradient norm to this (0 disables clipping).", type=float)
    mixed_precision: str = _opt(
        "no", "Autocast precision; fp16 needs a GPU.", type=str, choices=MIXED_PRECISION_CHOICES
    )
    report_to: str = _opt("tensorboard", "Tracker for accelerate.log.", type=str, choices=REPORT_TO_CHOICES)
    logging_dir: str = _opt("logs", "Tracker directory, relative to --output_dir.", type=str)
    tracker_project_name: str = _opt("diffusion-lab", "Run name in the tracker.", type=str)
    checkpointing_steps: int = _opt(500, "Write output_dir/checkpoint-<step> every this many steps.", type=int)
    checkpoints_total_limit: int | None = _opt(None, "Keep only this many newest checkpoints.", type=int)
    resume_from_checkpoint: str | None = _opt(
        None, "'latest' or a checkpoint folder (path, or name inside --output_dir) to resume exactly.", type=str
    )
    validation_steps: int = _opt(500, "Run the method's validation every this many steps (and at the end).", type=int)

    def validate(self) -> TrainConfig:
        """Reject impossible values with one-line UserErrors, before any model is loaded."""
        positive = (
            "train_batch_size",
            "num_train_epochs",
            "gradient_accumulation_steps",
            "checkpointing_steps",
            "validation_steps",
            "lr_num_cycles",
        )
        for name in positive:
            _check(getattr(self, name) >= 1, f"--{name} must be >= 1 (got {getattr(self, name)})")
        for name in ("max_train_steps", "checkpoints_total_limit"):
            value = getattr(self, name)
            _check(value is None or value >= 1, f"--{name} must be >= 1 or unset (got {value})")
        for name in ("lr_warmup_steps", "dataloader_num_workers"):
            _check(getattr(self, name) >= 0, f"--{name} must be >= 0 (got {getattr(self, name)})")
        _check(self.learning_rate > 0, f"--learning_rate must be > 0 (got {self.learning_rate})")
        _check(
            self.max_grad_norm >= 0, f"--max_grad_norm must be >= 0, 0 disables clipping (got {self.max_grad_norm})"
        )
        _check(self.adam_weight_decay >= 0, f"--adam_weight_decay must be >= 0 (got {self.adam_weight_decay})")
        _check(self.adam_epsilon > 0, f"--adam_epsilon must be > 0 (got {self.adam_epsilon})")
        for name in ("adam_beta1", "adam_beta2"):
            _check(0 <= getattr(self, name) < 1, f"--{name} must be in [0, 1) (got {getattr(self, name)})")
        _check(0 <= self.ema_decay <= 1, f"--ema_decay must be in [0, 1] (got {self.ema_decay})")
        _check(self.lr_power > 0, f"--lr_power must be > 0 (got {self.lr_power})")
        _check(
            self.mixed_precision in MIXED_PRECISION_CHOICES,
            f"--mixed_precision must be one of {', '.join(MIXED_PRECISION_CHOICES)} (got {self.mixed_precision!r})",
        )
        _check(
            self.lr_scheduler in LR_SCHEDULER_CHOICES,
            f"unknown --lr_scheduler {self.lr_scheduler!r}; choose one of {', '.join(LR_SCHEDULER_CHOICES)}",
        )
        _check(
            self.report_to in REPORT_TO_CHOICES,
            f"--report_to must be one of {', '.join(REPORT_TO_CHOICES)} (got {self.report_to!r})",
        )
        _check(bool(self.output_dir), "--output_dir must not be empty")
        if self.report_to in ("tensorboard", "wandb"):
            module = "tensorboard" if self.report_to == "tensorboard" else "wandb"
            _check(
                _importable(module),
                f"--report_to {self.report_to} needs the {module} package; "
                f"pip install {module} or pass --report_to none",
            )
        if self.use_8bit_adam:
            _check(
                _importable("bitsandbytes"),
                "--use_8bit_adam needs bitsandbytes (pip install bitsandbytes, CUDA only); drop the flag for AdamW",
            )
        return self


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def add_train_args(
    parser: argparse.ArgumentParser, defaults: Mapping[str, Any] | None = None
) -> argparse._ArgumentGroup:
    """Add every TrainConfig field as a ``--flag`` (plus ``--config``) to ``parser``; ``defaults`` re-bases them.

    A method passes its own defaults (say ``{"learning_rate": 1e-5}``) instead of re-declaring flags, so the flag
    set stays one list. Booleans are ``--flag/--no-flag`` so a YAML default of ``true`` can still be turned off.
    """
    group = parser.add_argument_group("training (common/train.py)")
    for f in fields(TrainConfig):
        meta = dict(f.metadata)
        help_text = meta.pop("help")
        if isinstance(f.default, bool):
            group.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        else:
            group.add_argument(f"--{f.name}", default=f.default, help=help_text, **meta)
    if not any("--config" in action.option_strings for action in parser._actions):
        group.add_argument(
            "--config",
            type=str,
            default=None,
            help="YAML file of flag defaults (keys = flag names); flags on the command line win.",
        )
    if defaults:
        unknown = sorted(set(defaults) - {a.dest for a in parser._actions})
        if unknown:
            raise ValueError(f"add_train_args(defaults=...) has keys that are not flags: {', '.join(unknown)}")
        parser.set_defaults(**defaults)
    return group


def load_yaml_defaults(path: str | os.PathLike, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Read a YAML mapping of flag defaults for ``parser``; unknown keys are a UserError, not silently dropped."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"--config {path}: not valid YAML ({' '.join(str(err).split())})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of flag: value, got {type(data).__name__}")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    known = {a.dest for a in parser._actions} - {"help", "config"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"--config {path}: unknown keys {', '.join(unknown)} (keys must be flag names of this script)")
    return data


def parse_args_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` with the ``--config`` YAML as flag defaults: config < command line."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if not known.config:
        return parser.parse_args(argv)
    overrides = load_yaml_defaults(known.config, parser)
    originals = {dest: parser.get_default(dest) for dest in overrides}
    # argparse applies an action's `type` to string defaults, so "1e-4" (a str in YAML 1.1) still becomes a float.
    parser.set_defaults(**overrides)
    try:
        return parser.parse_args(argv)
    finally:
        parser.set_defaults(**originals)  # leave the caller's parser as it was


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig part of a parsed namespace, validated; other (method) flags are ignored."""
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    return TrainConfig(**values).validate()


# --------------------------------------------------------------------------------------------------------------
# What a method gives and gets
# --------------------------------------------------------------------------------------------------------------


@dataclass
class StepContext:
    """Passed to ``loss_fn`` with each batch.

    ``models`` holds the *prepared* trainable modules (DDP/FSDP-wrapped: call these, not your originals, or the
    gradients are not synchronised) and the frozen ones (on the device, in ``weight_dtype``).
    """

    step: int  # optimizer steps completed so far (the step this batch contributes to is step + 1)
    epoch: int
    models: dict[str, nn.Module]
    accelerator: Any
    weight_dtype: torch.dtype

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


@dataclass
class LossOutput:
    """What ``loss_fn`` may return instead of a bare tensor: the scalar loss plus extra numbers to log."""

    loss: torch.Tensor
    logs: dict[str, float | torch.Tensor] = field(default_factory=dict)


@dataclass
class TrainResult:
    """The outcome of :meth:`Trainer.fit`.

    ``models`` are unwrapped (plain ``nn.Module`` / ``ModelMixin``) and hold the EMA weights when ``use_ema``, ready
    for ``save_pretrained``. ``loss_history`` is the global mean loss of every optimizer step of this run.
    """

    models: dict[str, nn.Module]
    global_step: int
    completed: bool
    stop_reason: str | None
    last_checkpoint: Path | None
    summary: dict[str, Any]
    loss_history: list[float]

    @property
    def exit_code(self) -> int:
        """0 when training ran to the end or stopped by :meth:`Trainer.request_stop`; 128 + signal number otherwise."""
        if self.completed or self.stop_reason in (None, "requested"):
            return 0
        return 128 + signal.Signals[self.stop_reason].value


LossFn = Callable[[Any, StepContext], Any]
ValidationFn = Callable[[int, dict[str, nn.Module]], Any]


# --------------------------------------------------------------------------------------------------------------
# Small helpers: RNG scopes, memory, images, checkpoint files
# --------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def rng_scope(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Run the body on torch/numpy/python RNGs seeded with ``seed``; restore the caller's states afterwards.

    Used around data fetching and validation so they never advance the training RNG (see the module docstring).
    Only the CPU generator, and ``device``'s if it is a CUDA device, are forked: cheap enough to run per batch.
    """
    cuda = [device] if device is not None and device.type == "cuda" else []
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy SeedSequence), so (seed, epoch, i) streams do not overlap."""
    return int(np.random.SeedSequence([int(p) % 2**63 for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def peak_memory_mb(device: torch.device | None = None) -> float:
    """Peak memory of this process: CUDA ``max_memory_allocated`` on a GPU, else the peak RSS (``ru_maxrss``)."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def image_grid(images: Sequence[Any], cols: int | None = None):
    """Tile PIL images row-major into one image (cells sized to the largest image, black padding)."""
    from PIL import Image

    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w = max(im.width for im in images)
    h = max(im.height for im in images)
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    return grid


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of ``output_dir``, oldest first. ``*.tmp`` leftovers of a killed save never match."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def read_checkpoint_state(path: Path) -> dict[str, Any]:
    """The trainer_state.json of a checkpoint folder; a UserError if the folder is not one of ours."""
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise UserError(
            f"{path} is not a checkpoint of this trainer (no {STATE_FILE}); "
            "pass a checkpoint-<step> folder written by common/train.py or 'latest'"
        )
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{state_file} is unreadable ({err}); pick another checkpoint") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise UserError(f"{path} is not a checkpoint of this trainer (unknown format in {STATE_FILE})")
    return state


def resolve_resume_path(resume: str | None, output_dir: str | os.PathLike) -> Path | None:
    """``latest`` -> newest complete checkpoint (or None: fresh start); a path or a name inside ``output_dir``."""
    if not resume:
        return None
    if resume == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    candidates = [Path(resume), Path(output_dir) / resume]
    for candidate in candidates:
        if candidate.is_dir():
            read_checkpoint_state(candidate)
            return candidate
    raise UserError(
        f"--resume_from_checkpoint {resume}: no such checkpoint folder "
        f"(looked at {candidates[0]} and {candidates[1]}); use 'latest' or an existing checkpoint-<step>"
    )


def _fsync_tree(root: Path) -> None:
    """Flush a freshly written folder to disk before it is renamed into place (a rename must not outrun the data)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse O_RDONLY fsync on directories
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _module_signature(models: Mapping[str, nn.Module]) -> dict[str, dict[str, Any]]:
    """What identifies "the same run" for a resume: module names, classes and parameter shapes (as counts)."""
    return {
        name: {
            "class": type(m).__name__,
            "parameters": sum(p.numel() for p in m.parameters()),
            "tensors": sum(1 for _ in m.parameters()),
        }
        for name, m in models.items()
    }


def _unpack_loss(out: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """Accept a tensor, a LossOutput-like object (``.loss``, ``.logs``) or a mapping with a ``"loss"`` key."""
    if isinstance(out, torch.Tensor):
        loss, logs = out, {}
    elif isinstance(out, Mapping):
        loss, logs = out["loss"], {k: v for k, v in out.items() if k != "loss"}
    elif hasattr(out, "loss"):
        loss, logs = out.loss, dict(getattr(out, "logs", None) or {})
    else:
        raise TypeError(f"loss_fn must return a scalar tensor, a LossOutput or a dict with 'loss'; got {type(out)}")
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        raise ValueError(f"loss_fn must return a scalar (0-d) tensor; got {getattr(loss, 'shape', type(loss))}")
    return loss, logs


def _tracker_safe(config: Mapping[str, Any]) -> dict[str, Any]:
    """Tensorboard hparams accept only int/float/str/bool: stringify the rest (None, lists)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}


def _batch_size(batch: Any, default: int) -> int:
    try:
        return int(find_batch_size(batch))
    except (TypeError, ValueError, AttributeError):
        return default


@dataclass
class _Run:
    """Mutable state of one ``fit`` call: what was prepared, counters, and the current accumulation window."""

    loss_fn: LossFn
    validation_fn: ValidationFn | None
    optimizer: Any
    dataloader: Any
    lr_scheduler: Any
    clip_params: list[nn.Parameter]
    ctx: StepContext
    updates_per_epoch: int
    max_steps: int
    num_epochs: int
    global_step: int
    last_checkpoint: Path | None
    checkpointed_at: int
    validated_at: int = -1
    progress: Any = None
    history: list[float] = field(default_factory=list)
    steps_run: int = 0
    steps_timed: int = 0
    train_seconds: float = 0.0
    samples_timed: int = 0
    # the accumulation window of the optimizer step in progress
    window_start: float = 0.0
    micro_losses: list[float] = field(default_factory=list)
    micro_logs: dict[str, list[float]] = field(default_factory=dict)
    local_samples: int = 0
    grad_norm: Any = None

    def start_window(self) -> None:
        self.window_start = time.perf_counter()
        self.micro_losses, self.micro_logs, self.local_samples, self.grad_norm = [], {}, 0, None


# --------------------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------------------


class Trainer:
    """The single accelerate training loop; see the module docstring for the contract and an example.

    Construct it *before* building models: the constructor creates the Accelerator and seeds every RNG
    identically on all processes, so models built afterwards start identical everywhere and in every rerun.
    Use it as a context manager (or call :meth:`close`) so the process group is destroyed at exit.
    """

    def __init__(self, config: TrainConfig, *, ddp_find_unused_parameters: bool = False):
        self.config = config.validate()
        self.output_dir = Path(config.output_dir)
        self.resume_path = resolve_resume_path(config.resume_from_checkpoint, self.output_dir)
        self.resume_state = read_checkpoint_state(self.resume_path) if self.resume_path else None
        cpu = self._needs_cpu_flag()
        if config.mixed_precision == "fp16" and cpu:
            # accelerate silently drops fp16 on CPU (no autocast, no scaler) while still reporting "fp16", so frozen
            # modules cast to float16 would meet float32 activations. Say so instead of half-working.
            raise UserError(
                "--mixed_precision fp16 needs a GPU (accelerate would silently run it as fp32 on CPU); "
                "use --mixed_precision bf16 or no on CPU"
            )
        PartialState(cpu=cpu)  # joins the process group now, so a drawn seed can be broadcast before seeding
        self.seed = self._resolve_seed()
        self.accelerator = Accelerator(
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            mixed_precision=config.mixed_precision,
            log_with=None if config.report_to == "none" else config.report_to,
            project_config=ProjectConfiguration(
                project_dir=str(self.output_dir), logging_dir=str(self.output_dir / config.logging_dir)
            ),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=self.seed),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=ddp_find_unused_parameters)],
            cpu=cpu,
        )
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and self.accelerator.num_processes != world:
            raise RuntimeError(
                f"WORLD_SIZE={world} but accelerate set up {self.accelerator.num_processes} process(es); "
                "every process would train alone"
            )
        set_seed(self.seed)
        if config.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
        self._pending_stop: str | None = None  # set by a signal or request_stop() on *this* process
        self._stop_reason: str | None = None  # the decision, taken from the all-gathered codes: same on every rank
        self._previous_handlers: dict[int, Any] = {}
        self._closed = False
        self._trackers_started = False
        self._emas: dict[str, Any] = {}
        self._prepared: dict[str, nn.Module] = {}
        if self.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        atexit.register(_close_at_exit, weakref.ref(self))

    # ---- small public API --------------------------------------------------------------------------------------

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def unwrap(self, module: nn.Module) -> nn.Module:
        """The plain module behind a prepared (DDP/compiled) one, for ``save_pretrained`` or inspection."""
        return self.accelerator.unwrap_model(module)

    def request_stop(self) -> None:
        """Ask the loop to stop after the current optimizer step and write a checkpoint (exit code 0)."""
        self._pending_stop = self._pending_stop or "requested"

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[dict[str, nn.Module]]:
        """Temporarily load the EMA weights into the unwrapped trainable modules (no-op without ``use_ema``)."""
        modules = {name: self.unwrap(m) for name, m in self._prepared.items()}
        for name, ema in self._emas.items():
            ema.store(modules[name].parameters())
            ema.copy_to(modules[name].parameters())
        try:
            yield modules
        finally:
            for name, ema in self._emas.items():
                ema.restore(modules[name].parameters())

    def close(self, wait: bool = True) -> None:
        """Finish trackers and destroy the process group (else torch aborts at interpreter shutdown).

        ``wait``: first let every process arrive (so rank 0 finishes ``save_pretrained`` before the group goes);
        skipped when leaving on an exception, where the other ranks may never arrive.
        """
        if self._closed:
            return
        self._closed = True
        self._restore_signal_handlers()
        if wait and torch.distributed.is_available() and torch.distributed.is_initialized():
            self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.close(wait=exc_type is None)

    # ---- the loop ------------------------------------------------------------------------------------------------

    def fit(
        self,
        models: Mapping[str, nn.Module] | nn.Module,
        loss_fn: LossFn,
        train_data: Dataset | DataLoader,
        *,
        collate_fn: Callable | None = None,
        frozen: Mapping[str, nn.Module] | None = None,
        params: Iterable[Any] | None = None,
        validation_fn: ValidationFn | None = None,
    ) -> TrainResult:
        """Train ``models`` on ``loss_fn`` over ``train_data`` until ``max_train_steps`` or a stop signal.

        ``models``: trainable modules by name (a bare module is named ``"model"``); ``frozen``: modules the loss needs
        but does not train (moved to the device in ``weight_dtype``); ``params``: optimizer params or param groups
        (default: every ``requires_grad`` parameter of ``models``); ``train_data``: a map-style Dataset (batched
        with ``train_batch_size``, shuffled per epoch) or a DataLoader; ``validation_fn(step, models)`` runs on the
        main process on the EMA weights and may return PIL images, or a dict of scalars and/or image lists.
        """
        if self._prepared:
            raise RuntimeError("Trainer.fit runs once per Trainer (accelerate keeps what it prepared); make a new one")
        run = self._setup(models, loss_fn, train_data, collate_fn, frozen, params, validation_fn)
        from tqdm.auto import tqdm

        run.progress = tqdm(
            total=run.max_steps,
            initial=run.global_step,
            desc="steps",
            disable=not self.accelerator.is_local_main_process,
        )
        self._install_signal_handlers()
        try:
            first_epoch = run.global_step // run.updates_per_epoch
            skip = (run.global_step % run.updates_per_epoch) * self.config.gradient_accumulation_steps
            for epoch in range(first_epoch, run.num_epochs):
                if run.global_step >= run.max_steps or self._stop_reason:
                    break
                self._train_epoch(run, epoch, skip if epoch == first_epoch else 0)
        finally:
            run.progress.close()
            self._restore_signal_handlers()
        return self._finish(run)

    def _setup(self, models, loss_fn, train_data, collate_fn, frozen, params, validation_fn) -> _Run:
        """Build optimizer, data and schedule, ``accelerator.prepare`` them, attach EMA, resume, start trackers."""
        cfg, acc = self.config, self.accelerator
        models = {"model": models} if isinstance(models, nn.Module) else dict(models)
        frozen = dict(frozen or {})
        if set(models) & set(frozen):
            raise ValueError(f"module names used twice (trainable and frozen): {sorted(set(models) & set(frozen))}")
        self._prepare_modules(models, frozen)
        optimizer = self._make_optimizer(list(params) if params is not None else self._trainable_params(models))
        dataloader = self._make_dataloader(train_data, collate_fn)
        lr_scheduler = self._make_lr_scheduler(optimizer, dataloader)

        prepared = acc.prepare(*models.values(), optimizer, dataloader, lr_scheduler)
        self._prepared = dict(zip(models, prepared[: len(models)]))
        optimizer, dataloader, lr_scheduler = prepared[len(models) :]
        self._make_emas()

        updates_per_epoch = math.ceil(len(dataloader) / cfg.gradient_accumulation_steps)
        max_steps = cfg.max_train_steps or cfg.num_train_epochs * updates_per_epoch
        global_step = self._resume(models, updates_per_epoch)
        if self.resume_path is None:
            # Init used the seed shared by all ranks; training noise gets one stream per process from here on.
            # A resumed run instead continues the RNG streams restored from the checkpoint.
            set_seed(self.seed, device_specific=True)
        self._start_trackers()
        run = _Run(
            loss_fn=loss_fn,
            validation_fn=validation_fn,
            optimizer=optimizer,
            dataloader=dataloader,
            lr_scheduler=lr_scheduler,
            clip_params=[p for group in optimizer.param_groups for p in group["params"]],
            ctx=StepContext(global_step, 0, {**self._prepared, **frozen}, acc, self.weight_dtype),
            updates_per_epoch=updates_per_epoch,
            max_steps=max_steps,
            num_epochs=math.ceil(max_steps / updates_per_epoch),
            global_step=global_step,
            last_checkpoint=self.resume_path,
            checkpointed_at=global_step if self.resume_path else -1,
        )
        self._log_run_header(run)
        return run

    def _train_epoch(self, run: _Run, epoch: int, skip: int) -> None:
        """One pass over the data (from batch ``skip``); returns early at max steps or on a stop request."""
        for m in self._prepared.values():
            m.train()
        run.ctx.epoch = epoch
        run.start_window()
        for batch in self._epoch_batches(run.dataloader, epoch, skip):
            stop_code = self._micro_step(run, batch)
            if not self.accelerator.sync_gradients:
                continue
            run.global_step += 1
            self._after_optimizer_step(run, epoch, stop_code)
            if self._stop_reason or run.global_step >= run.max_steps:
                return
            run.start_window()

    def _micro_step(self, run: _Run, batch: Any) -> int:
        """Forward/backward of one batch; the optimizer steps only on accumulation boundaries (accelerate).

        Returns the largest stop code of all processes, gathered together with the loss (one collective).
        """
        acc, cfg = self.accelerator, self.config
        run.ctx.step = run.global_step
        with acc.accumulate(*self._prepared.values()):
            with acc.autocast():
                loss, logs = _unpack_loss(run.loss_fn(batch, run.ctx))
            acc.backward(loss)
            if acc.sync_gradients and cfg.max_grad_norm > 0:
                run.grad_norm = acc.clip_grad_norm_(run.clip_params, cfg.max_grad_norm)
            run.optimizer.step()
            run.lr_scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
        packed = torch.stack([loss.detach().float(), loss.new_tensor(self._stop_code(), dtype=torch.float32)])
        gathered = acc.gather(packed.unsqueeze(0)).view(-1, 2)
        run.micro_losses.append(gathered[:, 0].mean().item())
        for key, value in logs.items():
            value = value.detach().float().mean().item() if torch.is_tensor(value) else float(value)
            run.micro_logs.setdefault(key, []).append(value)
        run.local_samples += _batch_size(batch, cfg.train_batch_size)
        return int(gathered[:, 1].max().item())

    def _after_optimizer_step(self, run: _Run, epoch: int, stop_code: int) -> None:
        """EMA update, throughput and logs, then validation and checkpoint when due (or when stopping)."""
        acc, cfg = self.accelerator, self.config
        for name, ema in self._emas.items():
            ema.step(self.unwrap(self._prepared[name]).parameters())
        seconds = time.perf_counter() - run.window_start
        samples = run.local_samples * acc.num_processes
        run.steps_run += 1
        if run.steps_run > 1:  # the first step of a run pays one-off costs (allocations, lazy init): not timed
            run.train_seconds += seconds
            run.samples_timed += samples
            run.steps_timed += 1
        step_loss = sum(run.micro_losses) / len(run.micro_losses)
        run.history.append(step_loss)
        record = {
            "train_loss": step_loss,
            "lr": run.lr_scheduler.get_last_lr()[0],
            "samples_per_second": samples / max(seconds, 1e-9),
            "peak_memory_mb": peak_memory_mb(self.device),
            "epoch": epoch,
        }
        if run.grad_norm is not None:
            record["grad_norm"] = float(run.grad_norm)
        record.update({k: sum(v) / len(v) for k, v in run.micro_logs.items()})
        acc.log(record, step=run.global_step)
        run.progress.update(1)
        run.progress.set_postfix(loss=f"{step_loss:.4g}", lr=f"{record['lr']:.3g}", refresh=False)

        if run.validation_fn is not None and run.global_step % cfg.validation_steps == 0:
            self._validate(run.validation_fn, run.global_step)
            run.validated_at = run.global_step
        # Decide on the gathered code only: a signal that reaches one rank after the gather must wait for the next
        # step, or that rank alone would enter the (collective) checkpoint save and the job would hang.
        self._stop_reason = self._stop_name(stop_code)
        if run.global_step % cfg.checkpointing_steps == 0 or self._stop_reason:
            run.last_checkpoint = self.save_checkpoint(run.global_step, epoch)
            run.checkpointed_at = run.global_step

    def _finish(self, run: _Run) -> TrainResult:
        """Checkpoint a stop that came after the last step's check, final validation, summary, EMA swap."""
        completed = run.global_step >= run.max_steps
        if not completed and run.checkpointed_at != run.global_step:
            run.last_checkpoint = self.save_checkpoint(run.global_step, run.ctx.epoch)
        if completed and run.validation_fn is not None and run.validated_at != run.global_step:
            self._validate(run.validation_fn, run.global_step)
        summary = self._summary(run)
        final = {name: self.unwrap(m) for name, m in self._prepared.items()}
        for name, ema in self._emas.items():
            ema.copy_to(final[name].parameters())  # the returned / exported weights are the EMA ones
        return TrainResult(
            final, run.global_step, completed, self._stop_reason, run.last_checkpoint, summary, run.history
        )

    # ---- setup pieces ----------------------------------------------------------------------------------------

    def _resolve_seed(self) -> int:
        """The configured seed; if None, the checkpoint's seed on resume, else a fresh one shared by all ranks."""
        if self.config.seed is not None:
            return int(self.config.seed)
        if self.resume_state is not None:
            return int(self.resume_state["seed"])
        seed = [random.SystemRandom().randrange(2**31)]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast_object_list(seed, src=0)
        return seed[0]

    @staticmethod
    def _needs_cpu_flag() -> bool:
        """True on a machine without accelerator: accelerate must be told ``cpu=True`` to honour torchrun's env."""
        return not torch.accelerator.is_available()

    def _prepare_modules(self, models: dict[str, nn.Module], frozen: dict[str, nn.Module]) -> None:
        """Trainable modules in fp32 and train mode (diffusers' rule for mixed precision); frozen ones cast, placed."""
        for name, module in models.items():
            bad = {p.dtype for p in module.parameters() if p.requires_grad and p.dtype != torch.float32}
            if bad and self.config.mixed_precision != "no":
                raise ValueError(
                    f"trainable module {name!r} has {bad} parameters; keep trainable weights in float32 "
                    "and let --mixed_precision autocast"
                )
            if self.config.gradient_checkpointing:
                self._enable_gradient_checkpointing(name, module)
            module.train()
        for module in frozen.values():
            module.requires_grad_(False)
            module.to(self.device, dtype=self.weight_dtype)
            module.eval()

    @staticmethod
    def _enable_gradient_checkpointing(name: str, module: nn.Module) -> None:
        if hasattr(module, "enable_gradient_checkpointing"):  # diffusers ModelMixin
            module.enable_gradient_checkpointing()
        elif hasattr(module, "gradient_checkpointing_enable"):  # transformers PreTrainedModel
            module.gradient_checkpointing_enable()
        else:
            logger.warning(
                "--gradient_checkpointing: module %r (%s) has no checkpointing switch; left as is",
                name,
                type(module).__name__,
            )

    @staticmethod
    def _trainable_params(models: Mapping[str, nn.Module]) -> list[nn.Parameter]:
        seen: set[int] = set()
        out = []
        for module in models.values():
            for p in module.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        if not out:
            raise ValueError("no trainable parameters: every parameter of the given modules has requires_grad=False")
        return out

    def _make_optimizer(self, params: list[Any]) -> torch.optim.Optimizer:
        cfg = self.config
        lr = cfg.learning_rate
        if cfg.scale_lr:
            lr *= cfg.gradient_accumulation_steps * cfg.train_batch_size * self.accelerator.num_processes
        if cfg.use_8bit_adam:
            try:
                import bitsandbytes as bnb
            except ImportError as err:
                raise UserError(f"--use_8bit_adam needs bitsandbytes ({err}); pip install bitsandbytes") from None
            optimizer_cls = bnb.optim.AdamW8bit
        else:
            optimizer_cls = torch.optim.AdamW
        return optimizer_cls(
            params,
            lr=lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            weight_decay=cfg.adam_weight_decay,
            eps=cfg.adam_epsilon,
        )

    def _make_dataloader(self, data: Dataset | DataLoader, collate_fn: Callable | None) -> DataLoader:
        """Shuffled DataLoader with its own generator, so creating an iterator never draws from the global RNG."""
        cfg = self.config
        self._loader_generator = torch.Generator().manual_seed(self.seed)
        if isinstance(data, DataLoader):
            if data.generator is None:
                data.generator = self._loader_generator
            else:
                self._loader_generator = data.generator
            loader = data
        else:
            try:
                len(data)  # type: ignore[arg-type]
            except TypeError:
                raise TypeError("train_data must be a map-style Dataset (with __len__) or a DataLoader") from None
            loader = DataLoader(
                data,
                batch_size=cfg.train_batch_size,
                collate_fn=collate_fn,
                num_workers=cfg.dataloader_num_workers,
                # A separate generator for the sampler: accelerate re-seeds it with seed + epoch every epoch.
                sampler=RandomSampler(data, generator=torch.Generator().manual_seed(self.seed)),
                generator=self._loader_generator,
                drop_last=False,
            )
        if len(loader) == 0:
            raise UserError("the training data is empty (0 batches); check the dataset path and --train_batch_size")
        return loader

    def _make_lr_scheduler(self, optimizer: torch.optim.Optimizer, dataloader: DataLoader):
        """diffusers ``get_scheduler``; step counts x num_processes because accelerate steps it once per process."""
        from diffusers.optimization import get_scheduler

        cfg, n = self.config, self.accelerator.num_processes
        if cfg.max_train_steps is None:
            per_process_batches = math.ceil(len(dataloader) / n)
            total = cfg.num_train_epochs * math.ceil(per_process_batches / cfg.gradient_accumulation_steps)
        else:
            total = cfg.max_train_steps
        return get_scheduler(
            cfg.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=cfg.lr_warmup_steps * n,
            num_training_steps=total * n,
            num_cycles=cfg.lr_num_cycles,
            power=cfg.lr_power,
        )

    def _make_emas(self) -> None:
        """One diffusers EMAModel per trainable module, registered so save_state/load_state carry it exactly."""
        if not self.config.use_ema:
            return
        from diffusers.training_utils import EMAModel

        for name, module in self._prepared.items():
            plain = self.unwrap(module)
            is_diffusers = hasattr(plain, "config") and hasattr(type(plain), "from_config")
            ema = EMAModel(
                plain.parameters(),
                decay=self.config.ema_decay,
                foreach=self.config.foreach_ema,
                model_cls=type(plain) if is_diffusers else None,
                model_config=plain.config if is_diffusers else None,
            )
            self.accelerator.register_for_checkpointing(ema)
            self._emas[name] = ema

    def _start_trackers(self) -> None:
        if self.config.report_to != "none" and self.is_main_process and not self._trackers_started:
            self.accelerator.init_trackers(
                self.config.tracker_project_name, config=_tracker_safe(dataclasses.asdict(self.config))
            )
            self._trackers_started = True

    def _log_run_header(self, run: _Run) -> None:
        cfg, acc = self.config, self.accelerator
        total = cfg.train_batch_size * acc.num_processes * cfg.gradient_accumulation_steps
        logger.info(
            "***** training %d steps (%d epochs x %d batches/process); batch %d/process x %d processes x %d "
            "accumulation = %d; mixed precision %s; EMA %s *****",
            run.max_steps, run.num_epochs, len(run.dataloader), cfg.train_batch_size, acc.num_processes,
            cfg.gradient_accumulation_steps, total, cfg.mixed_precision, cfg.use_ema,
        )  # fmt: skip

    # ---- data ------------------------------------------------------------------------------------------------

    def _epoch_batches(self, dataloader: DataLoader, epoch: int, skip: int) -> Iterator[Any]:
        """Batches of ``epoch`` from batch ``skip`` on, each fetched in its own RNG scope (see module docstring)."""
        dataloader.set_epoch(epoch)  # accelerate propagates it to the seedable sampler: order = f(seed, epoch)
        sampler = dataloader.get_sampler() if hasattr(dataloader, "get_sampler") else None
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        self._loader_generator.manual_seed(derive_seed(self.seed, epoch, 1))  # worker base seeds: f(seed, epoch)
        loader = self.accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
        iterator = iter(loader)
        fetch = skip
        finished = False
        try:
            while True:
                with rng_scope(derive_seed(self.seed, epoch, 2, fetch, self.accelerator.process_index)):
                    try:
                        batch = next(iterator)
                    except StopIteration:
                        finished = True
                        return
                fetch += 1
                yield batch
        finally:
            if not finished and hasattr(loader, "end"):
                # Left mid-epoch (max steps, stop): unregister from accelerate's GradientState like a finished loop.
                with contextlib.suppress(ValueError):
                    loader.end()

    # ---- validation ------------------------------------------------------------------------------------------

    def _validate(self, validation_fn: ValidationFn, step: int) -> None:
        """Main process only, EMA weights, eval mode, a fixed RNG scope; images -> grid PNG + tracker."""
        acc = self.accelerator
        if acc.is_main_process:
            with self.ema_weights() as modules, rng_scope(derive_seed(self.seed, 3), self.device):
                modes = {name: m.training for name, m in modules.items()}
                for m in modules.values():
                    m.eval()
                try:
                    out = validation_fn(step, modules)  # no forced no_grad: guidance-style validation needs autograd
                finally:
                    for name, m in modules.items():
                        m.train(modes[name])
            self._record_validation(out, step)
        acc.wait_for_everyone()

    def _record_validation(self, out: Any, step: int) -> None:
        if out is None:
            return
        items = {"validation": out} if isinstance(out, (list, tuple)) else dict(out)
        scalars = {}
        for key, value in items.items():
            if isinstance(value, (list, tuple)) and value and hasattr(value[0], "convert"):
                grid = image_grid(value)
                folder = self.output_dir / "validation"
                folder.mkdir(parents=True, exist_ok=True)
                grid.save(folder / f"{key}-step{step:07d}.png")
                self._log_image(key, grid, step)
            elif isinstance(value, (int, float)) or (torch.is_tensor(value) and value.numel() == 1):
                scalars[key if key.startswith("validation") else f"validation/{key}"] = float(value)
        if scalars:
            self.accelerator.log(scalars, step=step)

    def _log_image(self, key: str, grid: Any, step: int) -> None:
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image(key, np.asarray(grid), step, dataformats="HWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({key: [wandb.Image(grid)]}, step=step)

    # ---- checkpoints -----------------------------------------------------------------------------------------

    def save_checkpoint(self, step: int, epoch: int) -> Path:
        """``accelerator.save_state`` into ``checkpoint-<step>.tmp``, fsync, rename; then rotate. Collective call.

        A kill at any point leaves the previous checkpoints untouched: until the rename the new one only exists
        as ``.tmp``, which ``latest`` ignores and the next save deletes. Old checkpoints are removed only after the
        new one is in place, so for a moment ``checkpoints_total_limit + 1`` exist.
        """
        acc = self.accelerator
        final = self.output_dir / f"{CHECKPOINT_PREFIX}{step}"
        tmp = final.with_name(final.name + TMP_SUFFIX)
        if acc.is_main_process:
            for leftover in self.output_dir.glob(f"{CHECKPOINT_PREFIX}*{TMP_SUFFIX}"):
                logger.info("removing leftover of an interrupted save: %s", leftover)
                shutil.rmtree(leftover, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = {
                "format": STATE_FORMAT,
                "global_step": step,
                "epoch": epoch,
                "seed": self.seed,
                "num_processes": acc.num_processes,
                "train_batch_size": self.config.train_batch_size,
                "gradient_accumulation_steps": self.config.gradient_accumulation_steps,
                "use_ema": self.config.use_ema,
                "modules": _module_signature({n: self.unwrap(m) for n, m in self._prepared.items()}),
                "config": dataclasses.asdict(self.config),
            }
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
            _fsync_tree(tmp)
            if final.exists():  # same step written by an earlier run into this output_dir: swap, then delete
                stale = final.with_name(final.name + ".replaced" + TMP_SUFFIX)
                os.rename(final, stale)
                os.rename(tmp, final)
                shutil.rmtree(stale, ignore_errors=True)
            else:
                os.rename(tmp, final)
            _fsync_dir(self.output_dir)
            self._rotate_checkpoints()
            logger.info("saved %s", final)
        acc.wait_for_everyone()
        return final

    def _rotate_checkpoints(self) -> None:
        limit = self.config.checkpoints_total_limit
        if limit is None:
            return
        checkpoints = list_checkpoints(self.output_dir)
        for old in checkpoints[: max(0, len(checkpoints) - limit)]:
            logger.info("checkpoints_total_limit=%d: removing %s", limit, old)
            shutil.rmtree(old, ignore_errors=True)

    def _resume(self, models: Mapping[str, nn.Module], updates_per_epoch: int) -> int:
        """Load the resume checkpoint (if any) into everything prepared; returns the global step to continue from."""
        cfg = self.config
        if cfg.resume_from_checkpoint and self.resume_path is None:
            logger.info(
                "--resume_from_checkpoint %s: no checkpoint in %s yet, starting a new run",
                cfg.resume_from_checkpoint,
                self.output_dir,
            )
            return 0
        if self.resume_path is None:
            if list_checkpoints(self.output_dir):
                logger.warning(
                    "%s already has checkpoints but --resume_from_checkpoint is not set: starting from "
                    "step 0 and overwriting / rotating them",
                    self.output_dir,
                )
            return 0
        state = self.resume_state
        assert state is not None
        mine = _module_signature(models)
        if state.get("modules") != mine or bool(state.get("use_ema")) != cfg.use_ema:
            raise UserError(
                f"{self.resume_path} is a checkpoint of a different run (modules "
                f"{_describe(state.get('modules'))}, EMA {state.get('use_ema')}; this run: "
                f"{_describe(mine)}, EMA {cfg.use_ema}); resume with the same model and --use_ema setting"
            )
        now = {
            "num_processes": self.accelerator.num_processes,
            "train_batch_size": cfg.train_batch_size,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
            "seed": self.seed,
        }
        changed = [k for k, v in now.items() if state.get(k) != v]
        if changed:
            logger.warning(
                "resuming %s with different %s: training continues but not bit-exactly",
                self.resume_path,
                ", ".join(changed),
            )
        try:
            self.accelerator.load_state(str(self.resume_path))
        except Exception as err:  # corrupt/truncated files: one line, the fix, no traceback
            raise UserError(
                f"cannot resume from {self.resume_path}: {type(err).__name__}: "
                f"{' '.join(str(err).split())[:300]}; pick another checkpoint or delete this one"
            ) from None
        for ema in self._emas.values():
            ema.to(self.device)  # accelerate loads custom states with map_location="cpu"
        step = int(state["global_step"])
        logger.info(
            "resumed from %s at step %d (epoch %d, skipping %d batches of it)",
            self.resume_path,
            step,
            step // updates_per_epoch,
            (step % updates_per_epoch) * cfg.gradient_accumulation_steps,
        )
        return step

    # ---- signals ---------------------------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT -> stop after this step with a checkpoint; only possible from the main thread."""
        if threading.current_thread() is not threading.main_thread():
            logger.info("not in the main thread: SIGTERM/SIGINT keep their default behaviour")
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous_handlers[sig] = signal.signal(sig, self._on_signal)

    def _restore_signal_handlers(self) -> None:
        for sig, handler in self._previous_handlers.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, handler)
        self._previous_handlers.clear()

    def _stop_code(self) -> float:
        """0: keep going; 1: request_stop(); else the signal number (shipped so every rank reports the same reason)."""
        if self._pending_stop is None:
            return 0.0
        return 1.0 if self._pending_stop == "requested" else float(signal.Signals[self._pending_stop].value)

    @staticmethod
    def _stop_name(code: int) -> str | None:
        return None if code == 0 else "requested" if code == 1 else signal.Signals(code).name

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self._pending_stop is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: the user does not want to wait for the checkpoint
        self._pending_stop = name
        print(
            f"[train] {name}: finishing the current step, then writing a checkpoint and exiting "
            "(Ctrl-C again to abort at once)",
            file=sys.stderr,
            flush=True,
        )

    # ---- summary ---------------------------------------------------------------------------------------------

    def _summary(self, run: _Run) -> dict[str, Any]:
        """Throughput over the timed steps (all but a run's first) and peak memory; also train_summary.json."""
        seconds = run.train_seconds
        summary = {
            "global_step": run.global_step,
            "steps_timed": run.steps_timed,
            "train_seconds": round(seconds, 4),
            "samples_per_second": run.samples_timed / seconds if seconds > 0 else None,
            "steps_per_second": run.steps_timed / seconds if seconds > 0 else None,
            "peak_memory_mb": round(peak_memory_mb(self.device), 1),
            "peak_memory_kind": "cuda_max_memory_allocated" if self.device.type == "cuda" else "ru_maxrss",
            "final_loss": run.history[-1] if run.history else None,
            "num_processes": self.accelerator.num_processes,
            "stop_reason": self._stop_reason,
        }
        if self.is_main_process:
            (self.output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
            logger.info("training summary: %s", summary)
        if self._trackers_started:
            numbers = {f"summary/{k}": v for k, v in summary.items() if isinstance(v, (int, float))}
            self.accelerator.log(numbers, step=run.global_step)
        return summary


def _describe(signature: Any) -> str:
    if not isinstance(signature, dict):
        return "unknown"
    return ", ".join(f"{n}={s.get('class')}[{s.get('parameters')} params]" for n, s in signature.items())


def _close_at_exit(ref: weakref.ReferenceType) -> None:
    trainer = ref()
    if trainer is not None:
        with contextlib.suppress(Exception):
            trainer.close()


__all__ = [
    "LossOutput",
    "StepContext",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "add_train_args",
    "config_from_args",
    "image_grid",
    "list_checkpoints",
    "load_yaml_defaults",
    "parse_args_with_config",
    "peak_memory_mb",
    "resolve_resume_path",
    "rng_scope",
]
