"""The method registry: every generation method of the lab behind one typed contract.

A method package declares ONE object, ``METHOD = MethodSpec(...)``, in a module named in :data:`REGISTRY`:

- ``settings``: a dataclass derived from :class:`SamplingSettings`; each field is made with :func:`setting` (default,
  help, bounds, choices, old flag spellings). ``scripts/sample.py`` generates its flags from it and
  ``scripts/app.py`` its controls, so a field exists once.
- ``load(checkpoint, device, dtype)`` -> a pipeline: ``pipeline(settings, *, generator=None, callback=None)`` returns
  a :class:`Generation` (images ``[N, 3, H, W]`` in [0, 1], or captions, plus extra outputs such as influence maps).
  ``generator=None`` draws the noise from ``settings.seed`` the way the method's release does; ``callback(stage,
  steps_done, total)`` reports the sampler's progress.

Modules are imported only when a method is asked for (``common`` never imports a method package at import time).
A sixth method = its package + one line in :data:`REGISTRY` (or :func:`register` / the ``DLAB_METHODS`` variable,
``name=module,name=module``, for a package outside this repository).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from common.errors import UserError


REPO = Path(__file__).resolve().parent.parent
# One line per method: its name -> the module that defines its ``METHOD``.
REGISTRY: dict[str, str] = {
    "baseline": "common.baseline",
    "contextdiff": "contextdiff.sample_cli",
    "shifted": "shifted.sample_cli",
    "codiff": "codiff.sample_cli",
    "sdg": "sdg.sample_cli",
    "versatile": "versatile.sample_cli",
}
ENV_VARIABLE = "DLAB_METHODS"
Progress = Callable[[str, int, int], None]  # (stage, steps done, total steps)


# ------------------------------------------------------------------------------------------------ settings


def setting(default: Any = None, help: str = "", *, low: Optional[float] = None, high: Optional[float] = None,
            choices: Optional[Sequence] = None, aliases: Sequence[str] = (), kind: str = "value",
            label: Optional[str] = None, page: bool = True, cli: bool = True):
    """A settings field. ``low`` / ``high``: inclusive bounds of a number; ``choices``: the allowed values;
    ``aliases``: old flag spellings, accepted with a warning; ``kind``: ``value`` | ``image`` (a path to an image:
    an upload on the page) | ``images`` (several) | ``mask`` (a class-id mask: drawn or uploaded on the page) |
    ``path`` (a file or folder for the command line only); ``page=False`` keeps it off the page, ``cli=False`` off
    the command line."""
    meta = dict(help=help, low=low, high=high, choices=None if choices is None else tuple(choices),
                aliases=tuple(aliases), kind=kind, label=label, page=page and kind != "path", cli=cli)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def shared(name: str, default: Any):
    """A field of :class:`SamplingSettings` with a method's own default (the same help, bounds and aliases)."""
    meta = SamplingSettings.__dataclass_fields__[name].metadata
    return field(default=default, metadata=meta)


@dataclass
class SamplingSettings:
    """The settings every method reads; a method's settings dataclass derives from it."""

    prompts: list = setting([], "the prompts, one per image", page=False, cli=False)
    seed: int = setting(0, "random seed", low=0, high=2**32 - 1)
    num_inference_steps: int = setting(50, "sampling steps", low=1, high=1000, aliases=("--steps",),
                                       label="steps")
    guidance_scale: float = setting(7.5, "classifier-free guidance scale (1 = off)", low=0.0, high=100.0,
                                    aliases=("--scale",))
    negative_prompt: str = setting("", "the unconditional prompt for classifier-free guidance")
    sampler: str = setting("ddim", "sampler", choices=("ddim", "ddpm"))
    eta: float = setting(0.0, "DDIM eta (0 = deterministic)", low=0.0, high=1.0)
    resolution: Optional[int] = setting(None, "image side in pixels (default: the model's)", low=8)
    # The memory budget: entry scripts fill it from their --max_memory_gb flag; pipelines that plan their memory
    # (common.memory) pick the VAE's slicing / tiling and the attention chunking that fit it.
    max_memory_gb: Optional[float] = setting(None, "memory budget in GB (default: the machine's memory)", low=0.0,
                                             page=False, cli=False)

    def check(self) -> None:
        """Every field within its bounds and choices: UserError naming the flag otherwise. Methods extend it."""
        for f in dataclasses.fields(self):
            check_value(f, getattr(self, f.name))

    def needs_prompt(self) -> bool:
        """False when the prompts only label the outputs (an unguided or image-conditioned run)."""
        return True

    def makes_images(self) -> bool:
        """False when this run's outputs are captions."""
        return True


SHARED_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingSettings))


def check_value(f: dataclasses.Field, value: Any) -> None:
    meta = f.metadata
    flag = f"--{f.name}"
    if value is None:
        return
    if meta.get("choices") is not None:
        values = value if isinstance(value, list) else [value]
        for v in values:
            if v not in meta["choices"]:
                raise UserError(f"{flag} {v!r}: choose one of {', '.join(map(str, meta['choices']))}")
    low, high = meta.get("low"), meta.get("high")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if low is not None and high is not None and not low <= value <= high:
            raise UserError(f"{flag} must lie in [{low:g}, {high:g}], got {value:g}")
        if low is not None and value < low:
            raise UserError(f"{flag} must be >= {low:g}, got {value:g}")
        if high is not None and value > high:
            raise UserError(f"{flag} must be <= {high:g}, got {value:g}")


def settings_fields(cls) -> list[tuple[dataclasses.Field, Any]]:
    """``(field, python type)`` of a settings dataclass (``Optional[X]`` -> ``X``), in declaration order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if typing.get_origin(kind) is Union:
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        out.append((f, typing.get_origin(kind) or kind))
    return out


def settings_from(cls, values: dict):
    """A settings object from plain values (missing keys: the defaults); unknown keys are a UserError."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UserError(f"unknown setting {unknown[0]!r}: known are {', '.join(sorted(names))}")
    return cls(**values)


def settings_dict(settings) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(settings).items()}


# ------------------------------------------------------------------------------------------ command line


class _OldSpelling(argparse.Action):
    """An old flag spelling: works as the new one, with a one-line note on stderr (after which an error is still one "error:" line)."""

    def __init__(self, option_strings, dest, new_flag: str = "", append: bool = False, **kwargs):
        self.new_flag, self.append = new_flag, append
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"note: {option_string} is an old spelling of {self.new_flag}: use {self.new_flag}",
              file=sys.stderr)
        if self.append:
            values = [*(getattr(namespace, self.dest, None) or []), values]
        setattr(namespace, self.dest, values)


def add_old_spelling(group, old: str, new: str, dest: str, **kwargs) -> None:
    group.add_argument(old, dest=dest, action=_OldSpelling, new_flag=new, default=argparse.SUPPRESS,
                       help=argparse.SUPPRESS, **kwargs)


def add_flag(group, flag: str, *old_spellings: str, dest: str | None = None, **kwargs) -> None:
    """``group.add_argument(flag, ...)`` plus old spellings that work as ``flag`` with a one-line note."""
    dest = dest or flag.lstrip("-")
    group.add_argument(flag, dest=dest, **kwargs)
    extra = {k: kwargs[k] for k in ("type",) if k in kwargs}
    for old in old_spellings:
        add_old_spelling(group, old, flag, dest, **extra)


def add_settings_arguments(group, cls, skip: Sequence[str] = ()) -> None:
    """One flag per field of ``cls`` (``--name``) with its default, help and choices; old spellings warn."""
    for f, kind in settings_fields(cls):
        meta = f.metadata
        if not meta.get("cli", True) or f.name in skip:
            continue
        flag = f"--{f.name}"
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = meta.get("help", "")
        if kind is bool:
            action = argparse.BooleanOptionalAction if default else "store_true"
            group.add_argument(flag, action=action, default=bool(default), help=help_text)
            continue
        kwargs: dict = dict(help=help_text)
        if kind is list:
            kwargs.update(action="append", default=None)
        else:
            kwargs.update(type=kind if kind in (int, float) else str, default=default)
            if meta.get("choices") is not None:  # checked by the settings' check(): a one-line error
                kwargs["metavar"] = "{" + ",".join(map(str, meta["choices"])) + "}"
            if default not in (None, "") and help_text:
                kwargs["help"] = f"{help_text} (default {default})"
        group.add_argument(flag, **kwargs)
        for old in meta.get("aliases", ()):
            extra = {} if kind is list else {"type": kwargs["type"]}
            add_old_spelling(group, old, flag, f.name, append=kind is list, **extra)


def settings_from_args(cls, args: argparse.Namespace, **given):
    """The settings object of parsed flags (``given``: fields that do not come from a flag, e.g. prompts)."""
    values = {}
    for f, kind in settings_fields(cls):
        if f.name in given or not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        values[f.name] = ([] if value is None else list(value)) if kind is list else value
    return cls(**values, **given)


def settings_argv(settings, cls=None) -> list:
    """The flags that reproduce ``settings`` on the command line (fields equal to the default are left out)."""
    cls = cls or type(settings)
    defaults = cls()
    argv: list = []
    for f, kind in settings_fields(cls):
        if not f.metadata.get("cli", True):
            continue
        value = getattr(settings, f.name)
        if value == getattr(defaults, f.name) or value is None:
            continue
        if kind is bool:
            argv += [f"--{f.name}"] if value else [f"--no-{f.name}"]
        elif kind is list:
            for item in value:
                argv += [f"--{f.name}", str(item)]
        else:
            argv += [f"--{f.name}", repr(value) if isinstance(value, float) else str(value)]
    return argv


# ------------------------------------------------------------------------------------------------ contract


@dataclass
class Generation:
    """What a pipeline returns: images ``[N, 3, H, W]`` in [0, 1] (None for captions), captions, and extra outputs
    (e.g. ``influence``: modality -> ``[steps, N, 1, h, w]`` maps)."""

    images: Any = None
    texts: Optional[list] = None
    extras: dict = field(default_factory=dict)


@dataclass(frozen=True)
class MethodSpec:
    """One method. ``default_checkpoint``: its shipped tiny checkpoint, relative to the repository root;
    ``evaluate_digits(output_dir, n, seed) -> scores``: the judged digits protocol (demo, cross-method bench);
    ``mask_format(checkpoint)``: the class-id mask format a ``mask`` field is drawn in (None if unknown)."""

    name: str
    label: str
    settings: type
    load: Callable[..., Any]
    default_checkpoint: str
    description: str = ""
    evaluate_digits: Optional[Callable[..., dict]] = None
    mask_format: Optional[Callable[[str], Any]] = None

    def checkpoint_path(self, checkpoint_root: Optional[str] = None) -> Path:
        """The shipped checkpoint, or the same relative place under ``checkpoint_root`` (laid out like
        ``ckpt/tiny``)."""
        default = Path(self.default_checkpoint)
        if checkpoint_root:
            return Path(checkpoint_root) / default.relative_to("ckpt/tiny")
        return REPO / default


_added: dict[str, str] = {}


def register(name: str, module: str) -> None:
    """Add a method defined outside :data:`REGISTRY` (its module's ``METHOD`` is imported when asked for)."""
    _added[name] = module


def registry() -> dict[str, str]:
    entries = dict(REGISTRY)
    for item in filter(None, os.environ.get(ENV_VARIABLE, "").split(",")):
        name, sep, module = item.partition("=")
        if not sep or not name.strip() or not module.strip():
            raise UserError(f"{ENV_VARIABLE} entry {item!r}: write name=module (comma-separated)")
        entries[name.strip()] = module.strip()
    entries.update(_added)
    return entries


def names() -> tuple[str, ...]:
    return tuple(registry())


def get(name: str) -> MethodSpec:
    """The :class:`MethodSpec` of a registered method (its module imported now)."""
    entries = registry()
    if name not in entries:
        raise UserError(f"unknown method {name!r}: choose one of {', '.join(entries)}")
    module = importlib.import_module(entries[name])
    spec = getattr(module, "METHOD", None)
    if not isinstance(spec, MethodSpec) or spec.name != name:
        raise UserError(f"{entries[name]} does not define METHOD = MethodSpec(name={name!r}, ...)")
    return spec


def specs(names_: Optional[Sequence[str]] = None) -> dict[str, MethodSpec]:
    return {n: get(n) for n in (names_ or names())}


class TerminalProgress:
    """A :data:`Progress` callback drawing one tqdm bar per sampling stage (what the command line shows)."""

    def __init__(self):
        self.bar = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        from tqdm.auto import tqdm

        if done == 0 or self.bar is None:
            self.close()
            self.bar = tqdm(total=total, desc=stage, leave=False)
        if done > self.bar.n:
            self.bar.update(done - self.bar.n)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
