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

Exact resume. A checkpoint is ``accelerator.save_state``'s models (safetensors), optimizer, LR scheduler and
GradScaler (torch files accelerate reads with ``weights_only=True``), plus this trainer's own safetensors of the
EMA and of each process's torch/numpy/python RNG states (accelerate would pickle those and read the EMA back with
``weights_only=False``), ``trainer_state.json`` and, written last, ``manifest.json`` (size and sha256 of every
file; see :mod:`common.checkpoint`). A resume verifies all of it first: a damaged checkpoint is refused with one
line naming the file, and ``latest`` falls back to the newest checkpoint that verifies, with a warning. The
data order is a pure function of ``(seed, epoch)`` (accelerate's seedable sampler, ``set_epoch`` every epoch),
and a resumed run skips the batches of the current epoch already consumed (``skip_first_batches``); a stream of tar
shards (:class:`common.shards.ShardStream`, split by rank and worker itself) starts at that position instead. Two
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

One writer per folder. The main process holds ``<output_dir>/.trainer.lock`` (pid, host, start time) from the
constructor to :meth:`Trainer.close`; a second trainer on the folder is refused with one line (exit code 2 through
``cli_entry``), and the lock of a dead process on this host is taken over with a warning. Temporary checkpoint
folders carry the writer's host and pid, so cleaning up never removes another live writer's save. A fresh start
into a folder whose newest checkpoint belongs to another run (another :func:`run_fingerprint`) is refused unless
``--resume_from_checkpoint`` asks to continue it. A full, read-only or forbidden disk during a save is one line
naming the path and the space a checkpoint needs; the temporary folder is removed, earlier checkpoints stay.

Multi-process: ``torchrun --nproc_per_node N script.py`` or ``accelerate launch [--cpu] --num_processes N``. On a
machine without GPU accelerate needs ``cpu=True`` to see the torchrun environment (else every process trains
alone, silently); the trainer passes it and refuses to run if WORLD_SIZE > 1 but accelerate found one process.

Engines (:mod:`common.engines`). Whatever accelerate selected (plain, DDP, FSDP1/2, DeepSpeed ZeRO) is named in the
run header. Under FSDP and DeepSpeed the trainable modules are prepared as one ``ModuleBundle`` and ``ctx.models``
holds handles that call them through the bundle's forward; validation and the returned models use full weights
gathered with ``accelerator.get_state_dict`` (every process enters, the main process rebuilds plain modules);
``--use_ema`` is refused where parameters are sharded (FSDP, ZeRO-3); FSDP checkpoints are full state dicts.
FSDP requested on a machine without GPU (where accelerate would train DDP) runs as FSDP2 over gloo.
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

from common.checkpoint import (
    CheckpointInvalid,
    OutputLock,
    disk_fault,
    disk_faults_as_user_errors,
    ema_file,
    is_disk_fault,
    load_ema_state,
    load_rng_state,
    rng_file,
    save_ema_state,
    save_rng_state,
    state_bytes,
    token_writer_alive,
    verify_checkpoint,
    write_manifest,
    writer_token,
)
from common.engines import (
    ModuleBundle,
    Routed,
    check_requested_engine,
    describe_engine,
    engine_of,
    full_modules,
    module_bytes,
    prepare_fsdp_plugin,
    refuse_sharded_ema,
    weightless_copy,
)
from common.errors import UserError, one_line


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
    compile: bool = _opt(
        False,
        "torch.compile the trainable modules (fixed shapes, compiled in place; the first step pays the compile "
        "time). Without a compiler: one note, then eager.",
    )
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
    mixed_precision: str | None = _opt(
        None,
        "Autocast precision; fp16 needs a GPU. Default: what the launcher says (accelerate config / "
        "accelerate launch --mixed_precision, else no).",
        type=str,
        choices=MIXED_PRECISION_CHOICES,
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
            self.mixed_precision is None or self.mixed_precision in MIXED_PRECISION_CHOICES,
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
    for ``save_pretrained``; under FSDP / DeepSpeed the main process gets plain modules rebuilt from the gathered
    weights and the other processes their own (sharded) ones. ``loss_history`` is the global mean loss of every
    optimizer step of this run.
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


def validation_images(value: Any) -> list[Any]:
    """PIL images from what a validation_fn returns for one key, or [] if it is not images.

    Accepted: a PIL image or a list of them; a float tensor ``[B, C, H, W]`` / ``[C, H, W]`` or a list of
    ``[C, H, W]`` tensors with values in [0, 1] (diffusers' ``output_type="pt"`` convention), C in {1, 3, 4}.
    """
    from PIL import Image

    from common.io import to_pil

    def is_image_tensor(t: Any, ndim: int) -> bool:
        return torch.is_tensor(t) and t.ndim == ndim and t.shape[-3] in (1, 3, 4) and t.is_floating_point()

    if isinstance(value, Image.Image):
        return [value]
    if is_image_tensor(value, 4):
        return [to_pil(im, value_range=(0, 1)) for im in value]
    if is_image_tensor(value, 3):
        return [to_pil(value, value_range=(0, 1))]
    if isinstance(value, (list, tuple)) and value:
        if all(isinstance(v, Image.Image) for v in value):
            return list(value)
        if all(is_image_tensor(v, 3) for v in value):
            return [to_pil(v, value_range=(0, 1)) for v in value]
    return []


def configure_logging() -> None:
    """INFO from the trainer (run header, checkpoints, validation) by default, as diffusers' example scripts.

    Nothing changes when the program configured logging itself (root handlers present, or a level set on
    ``common``); other processes than the main one only warn.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(
            format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S"
        )
    package = logging.getLogger("common")
    if package.level == logging.NOTSET:
        main = os.environ.get("RANK", "0") == "0"
        package.setLevel(logging.INFO if main else logging.WARNING)


def resolve_mixed_precision(flag: str | None) -> str:
    """``--mixed_precision`` if given, else the launcher's choice (``accelerate launch`` exports its flag or its
    config file's value as ACCELERATE_MIXED_PRECISION), else ``"no"``."""
    if flag is not None:
        return flag
    value = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower()
    if value not in MIXED_PRECISION_CHOICES:
        raise UserError(
            f"the launcher asks for mixed precision {value!r} (ACCELERATE_MIXED_PRECISION); this trainer supports "
            f"{', '.join(MIXED_PRECISION_CHOICES)}: pass --mixed_precision"
        )
    return value


def _flag_value(argv: Sequence[str], *names: str) -> str | None:
    """The value of ``--name VALUE`` or ``--name=VALUE`` in ``argv`` (the last one wins), else None."""
    found = None
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                found = argv[i + 1]
            elif arg.startswith(name + "="):
                found = arg.split("=", 1)[1]
    return found


def launcher_requested_processes(parent_argv: Sequence[str] | None = None) -> tuple[str, int] | None:
    """``(launcher, number of processes it was asked for)`` when that can be known, else None.

    torchrun (and accelerate's multi-process launchers, which run torchrun) export WORLD_SIZE. ``accelerate
    launch`` without ``--multi_gpu`` starts ONE process whatever ``--num_processes`` (or its config file) says, and
    exports only ACCELERATE_* settings; the count is then read from the launching command line (the parent
    process: ``--num_processes`` or ``--config_file``, else accelerate's default config file).
    """
    if "WORLD_SIZE" in os.environ:
        return "torchrun", int(os.environ["WORLD_SIZE"])
    if "ACCELERATE_USE_CPU" not in os.environ and "ACCELERATE_MIXED_PRECISION" not in os.environ:
        return None  # plain `python script.py`: nothing was asked
    if parent_argv is None:
        try:
            raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
        except OSError:
            return None
        parent_argv = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    if not any(a.endswith("accelerate") or a == "launch" for a in parent_argv):
        return None
    num = _flag_value(parent_argv, "--num_processes", "--num-processes")
    if num is None:
        config_file = _flag_value(parent_argv, "--config_file", "--config-file")
        if config_file is None:
            with contextlib.suppress(Exception):
                from accelerate.commands.config.config_args import default_config_file

                config_file = default_config_file
        if config_file and Path(config_file).is_file():
            with contextlib.suppress(Exception):
                import yaml

                loaded = yaml.safe_load(Path(config_file).read_text())
                num = str(loaded.get("num_processes")) if isinstance(loaded, dict) else None
    try:
        return ("accelerate launch", int(num)) if num is not None else None
    except ValueError:
        return None


def launch_mismatch_note(requested: tuple[str, int] | None, world_size: int) -> str | None:
    """A warning line when the launcher was asked for another number of processes than the run got."""
    if requested is None or requested[1] == world_size or requested[1] < 1:
        return None
    launcher, asked = requested
    hint = ""
    if launcher == "accelerate launch" and not torch.accelerator.is_available():
        hint = (
            f"; without a GPU, accelerate launch starts one process unless given --multi_gpu: use `accelerate "
            f"launch --multi_gpu --num_processes {asked} ...` or `torchrun --nproc_per_node {asked} SCRIPT ...`"
        )
    return f"{launcher} was asked for {asked} processes but this run has {world_size}{hint}"


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
    """``latest`` -> newest checkpoint that verifies (or None: fresh start); a path or a name inside ``output_dir``.

    Every candidate is verified (:func:`common.checkpoint.verify_checkpoint`: manifest, sizes, sha256, RNG and EMA
    states). ``latest`` skips checkpoints that fail, with a warning naming the file, and refuses when none verifies;
    an explicit checkpoint that fails is a UserError.
    """
    if not resume:
        return None
    if resume == "latest":
        checkpoints = list_checkpoints(output_dir)
        failures = []
        for candidate in reversed(checkpoints):
            try:
                read_checkpoint_state(candidate)
                verify_checkpoint(candidate)
            except (UserError, CheckpointInvalid) as err:
                failures.append(one_line(str(err)))
                logger.warning("--resume_from_checkpoint latest: skipping %s: %s", candidate.name, one_line(str(err)))
                continue
            if failures:
                logger.warning(
                    "--resume_from_checkpoint latest: resuming from %s, the newest checkpoint that verifies", candidate
                )
            return candidate
        if failures:
            raise UserError(
                f"--resume_from_checkpoint latest: no checkpoint in {output_dir} verifies (newest: {failures[0]}); "
                "pass a good checkpoint folder or another --output_dir"
            )
        return None
    candidates = [Path(resume), Path(output_dir) / resume]
    for candidate in candidates:
        if candidate.is_dir():
            read_checkpoint_state(candidate)
            try:
                verify_checkpoint(candidate)
            except CheckpointInvalid as err:
                raise UserError(
                    f"--resume_from_checkpoint {resume}: refused, {err}; pick another checkpoint or 'latest'"
                ) from None
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


# The config keys that define a run's trajectory (with the modules and the seed); output paths, logging,
# checkpoint cadence and the step budget do not, so a run continued with a larger --max_train_steps is the same run.
RUN_KEYS = (
    "train_batch_size", "gradient_accumulation_steps", "learning_rate", "scale_lr", "lr_scheduler",
    "lr_warmup_steps", "lr_num_cycles", "lr_power", "use_8bit_adam", "use_ema", "ema_decay", "adam_beta1",
    "adam_beta2", "adam_weight_decay", "adam_epsilon", "max_grad_norm", "mixed_precision",
)  # fmt: skip


def run_fingerprint(signature: Mapping[str, Any], config: TrainConfig, seed: int) -> str:
    """A short hash of what makes two trainings "the same run": module signature, seed and :data:`RUN_KEYS`."""
    import hashlib

    identity = {"modules": signature, "seed": seed, "config": {k: getattr(config, k) for k in RUN_KEYS}}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def unpack_loss(out: Any) -> tuple[torch.Tensor, dict[str, Any]]:
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
        self._lock: OutputLock | None = None
        self._closed = False
        configure_logging()
        # No --mixed_precision: the launcher decides (accelerate launch exports its flag or config value).
        mixed_precision = resolve_mixed_precision(config.mixed_precision)
        self.config = config = dataclasses.replace(config, mixed_precision=mixed_precision)
        cpu = self._needs_cpu_flag()
        if config.mixed_precision == "fp16" and cpu:
            # accelerate silently drops fp16 on CPU (no autocast, no scaler) while still reporting "fp16", so frozen
            # modules cast to float16 would meet float32 activations. Say so instead of half-working.
            raise UserError(
                "--mixed_precision fp16 needs a GPU (accelerate would silently run it as fp32 on CPU); "
                "use --mixed_precision bf16 or no on CPU"
            )
        # Joins the process group now, so the lock / resume decision and a drawn seed can be broadcast.
        partial = PartialState(cpu=cpu)
        try:
            self._token, self.resume_path = self._claim_output_dir(partial.is_main_process)
            self.resume_state = read_checkpoint_state(self.resume_path) if self.resume_path else None
            self._init_accelerator(config, cpu, ddp_find_unused_parameters)
        except BaseException:
            self._release_lock()
            raise
        atexit.register(_close_at_exit, weakref.ref(self))

    def _claim_output_dir(self, is_main: bool) -> tuple[str, Path | None]:
        """Main process: create the folder, take its lock, pick and verify the resume checkpoint; all ranks learn it.

        Returns the writer token (names this run's temporary checkpoint folders) and the checkpoint to resume.
        """
        payload: list[Any] = [None]
        own_error: BaseException | None = None
        if is_main:
            try:
                with disk_faults_as_user_errors(self.output_dir, 1 << 20, "create the output folder"):
                    self.output_dir.mkdir(parents=True, exist_ok=True)
                    token = writer_token()
                    lock = OutputLock(self.output_dir, token)
                    lock.acquire()
                self._lock = lock
                resume = resolve_resume_path(self.config.resume_from_checkpoint, self.output_dir)
                payload = [{"token": token, "resume": str(resume) if resume else None, "error": None}]
            except Exception as err:  # every rank must hear of it, or the others wait in the broadcast forever
                own_error = err
                payload = [{"error": one_line(str(err)), "user": isinstance(err, UserError)}]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast_object_list(payload, src=0)
        if own_error is not None:
            raise own_error
        answer = payload[0]
        if answer["error"] is not None:
            raise (UserError if answer.get("user") else RuntimeError)(answer["error"])
        return answer["token"], Path(answer["resume"]) if answer["resume"] else None

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _init_accelerator(self, config: TrainConfig, cpu: bool, ddp_find_unused_parameters: bool) -> None:
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
        check_requested_engine(self.accelerator)  # FSDP asked for but DDP set up: switch (CPU) or refuse
        self.engine = engine_of(self.accelerator)
        self.engine_description = describe_engine(self.accelerator, self.engine)
        refuse_sharded_ema(self.engine, config.use_ema)
        if self.accelerator.gradient_accumulation_steps != config.gradient_accumulation_steps:
            raise UserError(
                f"the accelerate config accumulates {self.accelerator.gradient_accumulation_steps} batches but "
                f"--gradient_accumulation_steps is {config.gradient_accumulation_steps}; make them agree"
            )
        self.launch_note = launch_mismatch_note(launcher_requested_processes(), self.accelerator.num_processes)
        if self.launch_note and self.accelerator.is_main_process:
            logger.warning(self.launch_note)
        set_seed(self.seed)
        if config.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
        self._pending_stop: str | None = None  # set by a signal or request_stop() on *this* process
        self._stop_reason: str | None = None  # the decision, taken from the all-gathered codes: same on every rank
        self._previous_handlers: dict[int, Any] = {}
        self._trackers_started = False
        self._emas: dict[str, Any] = {}
        self._prepared: dict[str, Any] = {}  # what loss_fn calls: DDP-wrapped modules, or Routed handles (FSDP/DS)
        self._plain: dict[str, nn.Module] = {}  # the modules holding this process's weights (sharded under FSDP)
        self._roots: list[nn.Module] = []  # what accelerate prepared: one per module, or one ModuleBundle
        self._templates: dict[str, nn.Module] = {}  # weightless copies to rebuild full modules (FSDP/DS)
        self._signature: dict[str, Any] = {}
        self._fingerprint: str | None = None

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
        modules = dict(self._plain)
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
        try:
            self.accelerator.end_training()
        finally:
            self._release_lock()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, traceback: Any) -> None:
        self.close(wait=exc_type is None)
        if exc is not None and not isinstance(exc, UserError) and is_disk_fault(exc):
            # A full / read-only disk while the script exports its models inside the block: one line, not a
            # traceback (atomic writers have already removed their temporary output).
            path = getattr(exc, "filename", None) or self.output_dir
            raise disk_fault(exc, path, self._export_bytes(), "write") from None

    def _export_bytes(self) -> int:
        """Size of the modules a script exports (trainable and frozen weights), for a disk-fault message."""
        modules = list(self._templates.values() or self._plain.values()) + list(getattr(self, "_frozen", {}).values())
        return sum(module_bytes(m) for m in modules) + (1 << 20)

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
        with ``train_batch_size``, shuffled per epoch), a stream with ``make_loader`` (:class:`common.shards.ShardStream`:
        split by rank and worker, resumed by position) or a DataLoader; ``validation_fn(step, models)`` runs on the
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
        self._frozen = frozen
        self._signature = _module_signature(models)
        optimizer = self._make_optimizer(list(params) if params is not None else self._trainable_params(models))
        dataloader = self._make_dataloader(train_data, collate_fn)
        lr_scheduler = self._make_lr_scheduler(optimizer, dataloader)

        if self.engine.bundles_models:
            # FSDP2 and DeepSpeed prepare one model per call: every trainable module goes into one bundle, and the
            # loss calls each through the bundle's forward (Routed). Weightless copies rebuild full modules later.
            self._templates = {name: weightless_copy(m) for name, m in models.items()}
            bundle = ModuleBundle(models)
            if self.engine.kind == "FSDP":
                prepare_fsdp_plugin(acc, bundle)
            if self.engine.kind == "FSDP" and self.engine.fsdp_version == 1:
                root, optimizer, lr_scheduler = self._prepare_fsdp1(bundle, optimizer, dataloader)
                dataloader, lr_scheduler = acc.prepare(dataloader, lr_scheduler)
            else:
                root, optimizer, dataloader, lr_scheduler = acc.prepare(bundle, optimizer, dataloader, lr_scheduler)
            plain_bundle = self.unwrap(root)
            self._roots = [root]
            self._plain = {name: plain_bundle.parts[name] for name in models}
            self._prepared = {name: Routed(root, name, self._plain[name]) for name in models}
            self.engine_description = describe_engine(acc, self.engine)  # now with the auto-wrap classes
        else:
            prepared = acc.prepare(*models.values(), optimizer, dataloader, lr_scheduler)
            self._prepared = dict(zip(models, prepared[: len(models)]))
            optimizer, dataloader, lr_scheduler = prepared[len(models) :]
            self._roots = list(self._prepared.values())
            self._plain = {name: self.unwrap(m) for name, m in self._prepared.items()}
        self._make_emas()

        updates_per_epoch = math.ceil(len(dataloader) / cfg.gradient_accumulation_steps)
        max_steps = cfg.max_train_steps or cfg.num_train_epochs * updates_per_epoch
        global_step = self._resume(models, updates_per_epoch)
        if self.resume_path is None:
            # Init used the seed shared by all ranks; training noise gets one stream per process from here on.
            # A resumed run instead continues the RNG streams restored from the checkpoint.
            set_seed(self.seed, device_specific=True)
        self._start_trackers()
        if cfg.compile:
            from common.compile import CompileAfterFirstCall, default_options

            # The first step runs eagerly and names the trainable networks the loss calls; they are compiled in
            # place (checkpoints keep their keys, DDP wraps the same object). Channels-last stays off: safetensors
            # refuses to save its non-contiguous weights.
            loss_fn = CompileAfterFirstCall(
                loss_fn, default_options(channels_last=False), within=list(models.values())
            )
        run = _Run(
            loss_fn=loss_fn,
            validation_fn=validation_fn,
            optimizer=optimizer,
            dataloader=dataloader,
            lr_scheduler=lr_scheduler,
            # FSDP1 clips through the model's own clip_grad_norm_, which accelerate finds by its parameter list
            clip_params=list(self._roots[0].parameters())
            if self.engine.bundles_models
            else [p for group in optimizer.param_groups for p in group["params"]],
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
        for m in self._roots:
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
        with acc.accumulate(*self._roots):
            with acc.autocast():
                loss, logs = unpack_loss(run.loss_fn(batch, run.ctx))
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
            ema.step(self._plain[name].parameters())
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
            norm = run.grad_norm
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a replicated DTensor
            record["grad_norm"] = float(norm)
        record.update({k: sum(v) / len(v) for k, v in run.micro_logs.items()})
        acc.log(record, step=run.global_step)
        run.progress.update(1)
        run.progress.set_postfix(loss=f"{step_loss:.4g}", lr=f"{record['lr']:.3g}", refresh=False)

        # Decide on the gathered code only: a signal that reaches one rank after the gather must wait for the next
        # step, or that rank alone would enter the (collective) checkpoint save and the job would hang.
        self._stop_reason = self._stop_name(stop_code)
        if run.global_step % cfg.checkpointing_steps == 0 or self._stop_reason:
            run.last_checkpoint = self.save_checkpoint(run.global_step, epoch)
            run.checkpointed_at = run.global_step
        # Validation after the checkpoint: a validation that fails (or is killed) never costs the trained steps.
        if run.validation_fn is not None and run.global_step % cfg.validation_steps == 0 and not self._stop_reason:
            self._validate(run.validation_fn, run.global_step)
            run.validated_at = run.global_step

    def _finish(self, run: _Run) -> TrainResult:
        """Checkpoint a stop that came after the last step's check, final validation, summary, EMA swap."""
        completed = run.global_step >= run.max_steps
        if not completed and run.checkpointed_at != run.global_step:
            run.last_checkpoint = self.save_checkpoint(run.global_step, run.ctx.epoch)
        if completed and run.validation_fn is not None and run.validated_at != run.global_step:
            self._validate(run.validation_fn, run.global_step)
        summary = self._summary(run)
        if self.engine.bundles_models:
            # Every process enters the gather; the main process gets full plain modules (EMA applied), the others
            # keep their shards (scripts export on the main process only).
            final = self._full_modules() or dict(self._plain)
        else:
            final = dict(self._plain)
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
        from common.grad_checkpoint import enable_gradient_checkpointing

        parts = enable_gradient_checkpointing(module)
        if parts:
            logger.info("--gradient_checkpointing: %r checkpoints %s", name, ", ".join(parts))
        else:
            logger.warning(
                "--gradient_checkpointing: module %r (%s) has no blocks to checkpoint; left as is",
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
        elif isinstance(data, torch.utils.data.IterableDataset):
            # A stream resumes exactly only if it can start at a position; it splits itself across ranks and
            # workers (see common.shards), so accelerate's prepare leaves the returned loader as it is.
            if not hasattr(data, "make_loader"):
                raise UserError(
                    f"{type(data).__name__} is an iterable dataset the trainer cannot resume by position: stream "
                    "tar shards with common.shards.ShardStream (--train_shards), or pass a map-style Dataset"
                )
            loader = data.make_loader(
                batch_size=cfg.train_batch_size,
                rank=self.accelerator.process_index,
                world=self.accelerator.num_processes,
                num_workers=cfg.dataloader_num_workers,
                collate_fn=collate_fn,
                seed=self.seed,
                device=self.accelerator.device,
                generator=self._loader_generator,
            )
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
            # A stream's loader already counts this process's batches; a DataLoader is split by prepare later.
            per_process_batches = len(dataloader) if getattr(dataloader, "per_process", False) else \
                math.ceil(len(dataloader) / n)
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
        """One diffusers EMAModel per trainable module; checkpoints carry it as ``ema_<name>.safetensors``.

        Not registered with ``accelerator.register_for_checkpointing``: accelerate pickles registered objects and
        reads them back with ``torch.load(weights_only=False)``, which would run whatever a checkpoint file holds.
        """
        if not self.config.use_ema:
            return
        from diffusers.training_utils import EMAModel

        for name, plain in self._plain.items():
            is_diffusers = hasattr(plain, "config") and hasattr(type(plain), "from_config")
            ema = EMAModel(
                plain.parameters(),
                decay=self.config.ema_decay,
                foreach=self.config.foreach_ema,
                model_cls=type(plain) if is_diffusers else None,
                model_config=plain.config if is_diffusers else None,
            )
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
            "accumulation = %d; engine %s; mixed precision %s (weights of frozen modules %s); EMA %s; output %s *****",
            run.max_steps, run.num_epochs, len(run.dataloader), cfg.train_batch_size, acc.num_processes,
            cfg.gradient_accumulation_steps, total, self.engine_description, cfg.mixed_precision,
            str(self.weight_dtype).replace("torch.", ""), cfg.use_ema, self.output_dir,
        )  # fmt: skip
        if self.launch_note:
            logger.warning("***** %s *****", self.launch_note)

    # ---- data ------------------------------------------------------------------------------------------------

    def _epoch_batches(self, dataloader: DataLoader, epoch: int, skip: int) -> Iterator[Any]:
        """Batches of ``epoch`` from batch ``skip`` on, each fetched in its own RNG scope (see module docstring)."""
        dataloader.set_epoch(epoch)  # accelerate propagates it to the seedable sampler: order = f(seed, epoch)
        sampler = dataloader.get_sampler() if hasattr(dataloader, "get_sampler") else None
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        self._loader_generator.manual_seed(derive_seed(self.seed, epoch, 1))  # worker base seeds: f(seed, epoch)
        if hasattr(dataloader, "start_at"):  # a stream starts at a position instead of reading past batches
            dataloader.start_at(skip)
            loader = dataloader
        else:
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

    def _prepare_fsdp1(self, bundle: nn.Module, optimizer: Any, dataloader: DataLoader) -> tuple[Any, Any, Any]:
        """FSDP1 replaces the parameters it wraps, and accelerate does not re-point an optimizer built before (FSDP2
        and DeepSpeed do): wrap first, with ``use_orig_params`` so every parameter (and its param group) survives by
        name, then build the optimizer and its LR schedule on the wrapped parameters."""
        acc = self.accelerator
        acc.state.fsdp_plugin.use_orig_params = True
        names = {id(p): n for n, p in bundle.named_parameters()}
        root = acc.prepare(bundle)
        wrapped = {_canonical_name(n): p for n, p in root.named_parameters()}
        groups = [{**g, "params": [wrapped[names[id(p)]] for p in g["params"]]} for g in optimizer.param_groups]
        rebuilt = type(optimizer)(groups)  # every hyperparameter rides in its group
        lr_scheduler = self._make_lr_scheduler(rebuilt, dataloader)
        return root, acc.prepare(rebuilt), lr_scheduler

    def _full_modules(self) -> dict[str, nn.Module] | None:
        """FSDP / DeepSpeed: gather the trained modules (every process calls); full plain copies on the main process,
        with the EMA weights when ``use_ema``; None on the other processes."""
        full = full_modules(self.accelerator, self._roots[0], self._templates, self.device)
        if full is not None:
            for name, ema in self._emas.items():
                ema.copy_to(full[name].parameters())
        return full

    def _validate(self, validation_fn: ValidationFn, step: int) -> None:
        """Main process, EMA weights, eval mode, a fixed RNG scope, the training's autocast; images are
        written to ``output_dir/validation/step-<N>/`` and sent to every tracker, numbers to the trackers.

        Under FSDP / DeepSpeed every process first enters the gather of the full weights; the main process then
        validates on plain copies (so a validation_fn may call any method of a module, not only its forward).
        """
        acc = self.accelerator
        gathered = self._full_modules() if self.engine.bundles_models else None
        if acc.is_main_process:
            started = time.perf_counter()
            weights = contextlib.nullcontext(gathered) if gathered is not None else self.ema_weights()
            # Under the training autocast: frozen modules live in weight_dtype (bf16/fp16) and the trainable ones
            # in float32, and only autocast lets the two meet in one forward as they do in loss_fn.
            with weights as modules, rng_scope(derive_seed(self.seed, 3), self.device), acc.autocast():
                modes = {name: m.training for name, m in modules.items()}
                for m in modules.values():
                    m.eval()
                try:
                    out = validation_fn(step, modules)  # no forced no_grad: guidance-style validation needs autograd
                finally:
                    for name, m in modules.items():
                        m.train(modes[name])
            recorded = self._record_validation(out, step)
            logger.info("validation at step %d (%.1f s): %s", step, time.perf_counter() - started, recorded or "-")
        acc.wait_for_everyone()

    def _record_validation(self, out: Any, step: int) -> str:
        """Save and log what a validation_fn returned; returns a one-line description of what was recorded.

        ``out``: images (PIL images, a float tensor ``[B, C, H, W]`` or ``[C, H, W]`` tensors with values in
        [0, 1]), or a mapping of names to such images and/or scalars.
        """
        if out is None:
            return ""
        items = dict(out) if isinstance(out, Mapping) else {"validation": out}
        scalars, written = {}, []
        folder = self.output_dir / "validation" / f"step-{step}"
        for key, value in items.items():
            images = validation_images(value)
            if images:
                folder.mkdir(parents=True, exist_ok=True)
                stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", key)
                for i, image in enumerate(images):
                    image.save(folder / f"{stem}-{i:03d}.png")
                image_grid(images).save(folder / f"{stem}-grid.png")
                self._log_images(key, images, step)
                written.append(f"{len(images)} {key} images")
            elif isinstance(value, (int, float)) or (torch.is_tensor(value) and value.numel() == 1):
                scalars[key if key.startswith("validation") else f"validation/{key}"] = float(value)
        if scalars:
            self.accelerator.log(scalars, step=step)
        parts = ([f"{', '.join(written)} in {folder}"] if written else []) + [
            f"{k}={v:.4g}" for k, v in scalars.items()
        ]
        return "; ".join(parts)

    def _log_images(self, key: str, images: list[Any], step: int) -> None:
        """Every image to every tracker: tensorboard (one NHWC batch, or the grid if sizes differ) and wandb."""
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                arrays = [np.asarray(im.convert("RGB")) for im in images]
                if len({a.shape for a in arrays}) > 1:
                    arrays = [np.asarray(image_grid(images))]
                tracker.writer.add_images(key, np.stack(arrays), step, dataformats="NHWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({key: [wandb.Image(im, caption=f"{key} {i}") for i, im in enumerate(images)]}, step=step)

    # ---- checkpoints -----------------------------------------------------------------------------------------

    def save_checkpoint(self, step: int, epoch: int) -> Path:
        """Write ``checkpoint-<step>`` atomically, with a manifest written last; then rotate. Collective call.

        Everything goes to ``checkpoint-<step>.tmp-<writer token>`` first: accelerate's models / optimizer /
        scheduler, this trainer's RNG (per process) and EMA states as safetensors, ``trainer_state.json``, and last
        ``manifest.json`` (sizes and sha256 of every file); the folder is fsynced and renamed into place. A kill at
        any point leaves the previous checkpoints untouched: until the rename the new one only exists under its
        temporary name, which ``latest`` ignores and a later save removes once its writer is dead. Old checkpoints
        are removed only after the new one is in place, so for a moment ``checkpoints_total_limit + 1`` exist.

        A full, read-only or forbidden disk raises a one-line UserError naming the path and the space needed, with
        the temporary folder removed and every earlier checkpoint as it was; all processes raise together.
        """
        acc = self.accelerator
        final = self.output_dir / f"{CHECKPOINT_PREFIX}{step}"
        tmp = final.with_name(f"{final.name}{TMP_SUFFIX}-{self._token}")
        needed = self._checkpoint_bytes()
        if acc.is_main_process:
            self._remove_dead_leftovers()
        acc.wait_for_everyone()

        def write_states() -> None:  # every process: its RNG state; the main process also models and EMA
            acc.save_state(str(tmp))
            # accelerate's pickled RNG state is replaced by a safetensors file (read without unpickling)
            (tmp / f"random_states_{acc.process_index}.pkl").unlink(missing_ok=True)
            save_rng_state(tmp, acc.process_index)
            if acc.is_main_process:
                for name, ema in self._emas.items():
                    save_ema_state(ema, ema_file(tmp, name))

        def seal() -> None:  # main process, after every process wrote: state, fsync, manifest, rename, rotate
            state = {
                "format": STATE_FORMAT,
                "global_step": step,
                "epoch": epoch,
                "seed": self.seed,
                "accelerator_step": acc.step,
                "num_processes": acc.num_processes,
                "train_batch_size": self.config.train_batch_size,
                "gradient_accumulation_steps": self.config.gradient_accumulation_steps,
                "use_ema": self.config.use_ema,
                "modules": self._signature,
                "fingerprint": self._fingerprint,
                "config": dataclasses.asdict(self.config),
            }
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
            _fsync_tree(tmp)
            write_manifest(tmp)
            _fsync_dir(tmp)
            if final.exists():  # same step written by an earlier run of this fingerprint: swap, then delete
                stale = final.with_name(f"{final.name}.replaced{TMP_SUFFIX}-{self._token}")
                os.rename(final, stale)
                try:
                    os.rename(tmp, final)
                except OSError:
                    os.rename(stale, final)
                    raise
                shutil.rmtree(stale, ignore_errors=True)
            else:
                os.rename(tmp, final)
            _fsync_dir(self.output_dir)

        self._save_phase(write_states, tmp, final, needed, True)
        self._save_phase(seal, tmp, final, needed, acc.is_main_process)
        if acc.is_main_process:
            self._rotate_checkpoints()
            logger.info("saved %s", final)
        acc.wait_for_everyone()
        return final

    def _save_phase(self, body: Callable[[], None], tmp: Path, final: Path, needed: int, run_here: bool) -> None:
        """Run ``body`` (where ``run_here``), then agree across processes; on any failure remove ``tmp`` and raise.

        The agreement is the phase's barrier: a process that failed does not leave the others waiting.
        """
        own: BaseException | None = None
        message: str | None = None
        if run_here:
            try:
                with disk_faults_as_user_errors(final, needed, "write checkpoint"):
                    body()
            except Exception as err:
                own, message = err, one_line(str(err)) or type(err).__name__
        failures = self._gather_objects(message)
        failed = [m for m in failures if m is not None]
        if not failed:
            return
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        if own is not None:
            raise own
        raise UserError(f"checkpoint save failed on another process: {failed[0]}")

    def _gather_objects(self, obj: Any) -> list[Any]:
        if self.accelerator.num_processes > 1 and torch.distributed.is_initialized():
            out: list[Any] = [None] * self.accelerator.num_processes
            torch.distributed.all_gather_object(out, obj)
            return out
        return [obj]

    def _checkpoint_bytes(self) -> int:
        """Estimated size of one checkpoint: weights, optimizer state, EMA shadows, plus 1 MB of small files."""
        weights = sum(module_bytes(m) for m in (self._templates or self._plain).values())
        if self.engine.bundles_models:  # sharded optimizer states: Adam's two moments per weight
            optimizer = 2 * weights
        else:
            optimizer = sum(state_bytes(opt.state_dict().get("state", {})) for opt in self.accelerator._optimizers)
        ema = sum(state_bytes(list(e.shadow_params)) for e in self._emas.values())
        return weights + optimizer + ema + (1 << 20)

    def _remove_dead_leftovers(self) -> None:
        """Remove temporary checkpoint folders of interrupted saves: ours, unowned ones, or of a dead local writer.

        A folder whose writer is alive (or on another host) is left alone: it may be a save in progress.
        """
        for leftover in self.output_dir.glob(f"{CHECKPOINT_PREFIX}*{TMP_SUFFIX}*"):
            owner = leftover.name.split(TMP_SUFFIX, 1)[1]
            if owner and not owner.startswith("-"):
                continue  # not a name this trainer writes
            token = owner[1:]
            if token and token != self._token and token_writer_alive(token):
                logger.warning("leaving %s alone: its writer may still be running", leftover)
                continue
            logger.info("removing leftover of an interrupted save: %s", leftover)
            shutil.rmtree(leftover, ignore_errors=True)

    def _rotate_checkpoints(self) -> None:
        limit = self.config.checkpoints_total_limit
        if limit is None:
            return
        checkpoints = list_checkpoints(self.output_dir)
        for old in checkpoints[: max(0, len(checkpoints) - limit)]:
            logger.info("checkpoints_total_limit=%d: removing %s", limit, old)
            shutil.rmtree(old, ignore_errors=True)

    def _resume(self, models: Mapping[str, nn.Module], updates_per_epoch: int) -> int:
        """Load the resume checkpoint (if any) into everything prepared; returns the global step to continue from.

        The checkpoint was verified when it was chosen (manifest, RNG and EMA states). Without a resume request, a
        folder whose newest checkpoint belongs to another run (another fingerprint) is refused, so rotation and
        ``latest`` never mix two runs.
        """
        cfg, acc = self.config, self.accelerator
        mine = _module_signature(models)
        self._fingerprint = run_fingerprint(mine, cfg, self.seed)
        if cfg.resume_from_checkpoint and self.resume_path is None:
            logger.info(
                "--resume_from_checkpoint %s: no checkpoint in %s yet, starting a new run",
                cfg.resume_from_checkpoint,
                self.output_dir,
            )
            return 0
        if self.resume_path is None:
            self._refuse_foreign_checkpoints()
            return 0
        state = self.resume_state
        assert state is not None
        if state.get("modules") != mine or bool(state.get("use_ema")) != cfg.use_ema:
            raise UserError(
                f"{self.resume_path} is a checkpoint of a different run (modules "
                f"{_describe(state.get('modules'))}, EMA {state.get('use_ema')}; this run: "
                f"{_describe(mine)}, EMA {cfg.use_ema}); resume with the same model and --use_ema setting"
            )
        now = {
            "num_processes": acc.num_processes,
            "train_batch_size": cfg.train_batch_size,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
            "seed": self.seed,
        }
        changed = [k for k, v in now.items() if state.get(k) != v]
        saved_config = state.get("config") if isinstance(state.get("config"), dict) else {}
        changed += [k for k in RUN_KEYS if k in saved_config and k not in now and saved_config[k] != getattr(cfg, k)]
        if changed:
            logger.warning(
                "resuming %s with different %s: training continues but not bit-exactly",
                self.resume_path,
                ", ".join(changed),
            )
        if acc._custom_objects:
            # accelerate unpickles them without the weights-only restriction: code in the checkpoint would run
            raise RuntimeError(
                "objects registered with accelerator.register_for_checkpointing cannot be resumed safely; "
                "save their state as safetensors instead"
            )
        try:
            acc.load_state(str(self.resume_path))  # models (safetensors), optimizer/scheduler (weights_only=True)
        except Exception as err:  # corrupt/truncated files: one line, the fix, no traceback
            raise UserError(
                f"cannot resume from {self.resume_path}: {type(err).__name__}: "
                f"{one_line(str(err))[:300]}; pick another checkpoint or delete this one"
            ) from None
        acc.step = int(state.get("accelerator_step", 0))  # gradient-accumulation phase
        try:
            for name, ema in self._emas.items():
                load_ema_state(ema, ema_file(self.resume_path, name), self.device)
            rng = rng_file(self.resume_path, acc.process_index)
            if rng.is_file():
                load_rng_state(rng)
            else:  # resumed with more processes than saved: new ranks start fresh streams (warned above)
                logger.warning("%s is missing: process %d starts a fresh RNG stream", rng, acc.process_index)
                set_seed(derive_seed(self.seed, int(state["global_step"])), device_specific=True)
        except CheckpointInvalid as err:
            raise UserError(f"cannot resume from {self.resume_path}: {err}; pick another checkpoint") from None
        step = int(state["global_step"])
        logger.info(
            "resumed from %s at step %d (epoch %d, skipping %d batches of it)",
            self.resume_path,
            step,
            step // updates_per_epoch,
            (step % updates_per_epoch) * cfg.gradient_accumulation_steps,
        )
        return step

    def _refuse_foreign_checkpoints(self) -> None:
        """A fresh start into a folder with checkpoints: allowed for the same run (warned), refused otherwise."""
        existing = list_checkpoints(self.output_dir)
        if not existing:
            return
        newest = existing[-1]
        try:
            theirs = read_checkpoint_state(newest).get("fingerprint")
        except UserError:
            theirs = None
        if theirs != self._fingerprint:
            raise UserError(
                f"{self.output_dir} holds checkpoints of a different run ({newest.name}: fingerprint "
                f"{theirs or 'unknown'}, this run {self._fingerprint}); pass --resume_from_checkpoint latest "
                "(or a checkpoint folder) to continue it, or choose another --output_dir"
            )
        logger.warning(
            "%s already has checkpoints of this run but --resume_from_checkpoint is not set: starting from "
            "step 0 and overwriting / rotating them",
            self.output_dir,
        )

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


def _canonical_name(name: str) -> str:
    """A parameter's name without the wrapper prefixes FSDP1 and activation checkpointing insert."""
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name


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
