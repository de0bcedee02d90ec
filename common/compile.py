"""``--compile``: torch.compile of the networks a run calls in its hot loop, with shapes and fallbacks under control.

One run calls its denoiser with a small fixed set of shapes (the CFG batch ``2B`` of one resolution, or ``B`` when
guidance is off), so the networks are compiled with ``dynamic=False``: one graph per shape, specialised and free
of shape guards; timesteps are tensors, so a new step is a new input, never a recompilation (tested). Modules are
compiled *in place* (``nn.Module.compile`` semantics): the object, its ``state_dict`` keys and every reference a
method holds stay the same, which is what lets one switch cover every method and every trainer.

Sampling: ``scripts/sample.py --compile`` enters :func:`compiling`; inside it every sampler of
``common.samplers`` wraps its denoiser in :class:`CompileAfterFirstCall`: the first step runs eagerly and records
the networks the denoiser calls (a UNet behind a CFG wrapper, a collaboration's member UNets, ...), which are then
compiled; the second step pays the compile time, every later step reuses the graph.
Training: ``TrainConfig.compile`` does the same with the loss function and the trainable modules (the frozen
VAE and text encoder stay eager).

Where compilation is unavailable (dynamo unsupported on the platform, no C++ compiler for inductor on CPU, or any
exception when the first call compiles), the run says so in ONE line on stderr and continues eagerly. The price
of compiling is paid by the first call of every shape: seconds on a GPU for a full SD UNet (more with
``mode="max-autotune"``), tens of seconds on a CPU; later calls and later steps reuse the graph.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn


Backend = Union[str, Callable[..., Any]]


@dataclass(frozen=True)
class CompileOptions:
    """``backend``: torch.compile backend (``inductor``; ``aot_eager`` traces without generating code);
    ``mode``: inductor mode (``None``, ``reduce-overhead``, ``max-autotune``); ``channels_last``: convert
    conv networks to channels-last memory format (``None``: on for CUDA, off on CPU, where it measured no faster);
    ``freeze``: inductor's ``freezing`` for graphs run without gradients: the weights become constants of the graph
    (folded, and prepacked for oneDNN on CPU), so a later change of the weights is NOT seen by the compiled graph;
    for a sampling run, whose weights are fixed, never for training (measured 1.3x on the tiny UNet on CPU)."""

    backend: Backend = "inductor"
    mode: Optional[str] = None
    channels_last: Optional[bool] = None
    fullgraph: bool = False
    freeze: bool = False


BACKEND_VARIABLE = "DLAB_COMPILE_BACKEND"  # e.g. aot_eager: trace and check a run without generating code


def default_options(**changes: Any) -> CompileOptions:
    """The options of ``--compile``: inductor, or the backend named by the ``DLAB_COMPILE_BACKEND`` variable."""
    return dataclasses.replace(CompileOptions(backend=os.environ.get(BACKEND_VARIABLE) or "inductor"), **changes)


_state = threading.local()
_compiled_modules: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # every module compile_module compiled
_probed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # modules a first call has already been watched for
_warned: list[str] = []  # the one line already printed this process (a fallback is reported once, not per module)


def note_fallback(reason: str) -> None:
    """The single stderr line of a run that asked for --compile and runs eagerly."""
    if _warned:
        return
    line = f"note: --compile unavailable ({reason}); running eagerly"
    _warned.append(line)
    print(line, file=sys.stderr, flush=True)


def unavailable_reason(options: CompileOptions, device: Optional[torch.device] = None) -> Optional[str]:
    """Why torch.compile cannot work here, or None: dynamo unsupported, or inductor on CPU without a C++ compiler."""
    try:
        import torch._dynamo as dynamo
    except Exception as err:  # a torch build without dynamo
        return f"torch._dynamo cannot be imported: {type(err).__name__}"
    if not dynamo.is_dynamo_supported():
        return f"torch.compile is not supported on {sys.platform} with Python {sys.version.split()[0]}"
    if options.backend == "inductor" and (device is None or device.type == "cpu"):
        compiler = _cpp_compiler()
        if compiler is None:
            return "no C++ compiler found for inductor's CPU code: install g++ or clang++, or set CXX"
    return None


def _cpp_compiler() -> Optional[str]:
    from torch._inductor import config

    names = [os.environ.get("CXX"), config.cpp.cxx[1] if isinstance(config.cpp.cxx, tuple) else config.cpp.cxx,
             "g++", "c++", "clang++"]
    for name in filter(None, names):
        found = shutil.which(name)
        if found:
            return found
    return None


def is_compiled(module: nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def compile_module(module: nn.Module, options: CompileOptions = CompileOptions()) -> bool:
    """Compile ``module`` in place (its ``__call__`` runs the compiled graph); True if it will run compiled.

    A failure at the first call (the moment torch.compile actually compiles) prints the one fallback line, restores
    the eager module and returns the eager result, so a run never dies of --compile.
    """
    if is_compiled(module):
        return True
    device = _module_device(module)
    reason = unavailable_reason(options, device)
    if reason is not None:
        note_fallback(reason)
        return False
    _raise_recompile_limit()
    if _use_channels_last(options, device) and _has_conv(module):
        module.to(memory_format=torch.channels_last)
    # torch.compile takes a mode or an options dict, not both: freezing is dropped when a mode is asked for
    freeze = options.freeze and options.backend == "inductor" and not options.mode
    inductor_options = {"freezing": True} if freeze else None
    compiled = torch.compile(module._call_impl, backend=options.backend, mode=options.mode, dynamic=False,
                             fullgraph=options.fullgraph, options=inductor_options)

    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return compiled(*args, **kwargs)
        except Exception as err:  # compile-time failures of any kind (backend, codegen, C++ build, tracing)
            module._compiled_call_impl = None
            note_fallback(f"{type(err).__name__} while compiling {type(module).__name__}: "
                          + (" ".join(str(err).split())[:160] or "no message"))
            return module._call_impl(*args, **kwargs)

    module._compiled_call_impl = call
    _compiled_modules[module] = None
    return True


RECOMPILE_LIMIT = 64


def _raise_recompile_limit() -> None:
    """Every module compiled in place shares one code object (``nn.Module._call_impl``), and dynamo keeps at most
    ``recompile_limit`` (8) graphs per code object before it silently runs eagerly: a collaboration of several
    networks, each with a guided and an unguided batch, in training and in eval mode, needs more."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if isinstance(getattr(dynamo_config, name, None), int) and getattr(dynamo_config, name) < RECOMPILE_LIMIT:
            setattr(dynamo_config, name, RECOMPILE_LIMIT)


def _module_device(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def _use_channels_last(options: CompileOptions, device: torch.device) -> bool:
    if options.channels_last is not None:
        return options.channels_last
    return device.type == "cuda"


def _has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


# ------------------------------------------------------------------------------------------------ sampling


@contextlib.contextmanager
def compiling(options: Optional[CompileOptions]) -> Iterator[None]:
    """Inside: every sampler of ``common.samplers`` compiles the networks of its denoiser (None: no change)."""
    previous = getattr(_state, "options", None)
    _state.options = options
    try:
        yield
    finally:
        _state.options = previous


def active_options() -> Optional[CompileOptions]:
    return getattr(_state, "options", None)


def prepare_denoiser(denoiser: Any) -> Any:
    """Inside :func:`compiling`: ``denoiser`` wrapped so that its networks are compiled after its first call; outside:
    ``denoiser`` itself."""
    options = active_options()
    if options is None:
        return denoiser
    return CompileAfterFirstCall(denoiser, options)


class CompileAfterFirstCall:
    """Calls ``fn``; its first call runs eagerly and records the outermost ``nn.Module`` objects it calls, which are
    then compiled in place, so later calls run their graphs.

    Watching the first call, rather than compiling whatever module a wrapper holds, finds the networks that really
    run, however the wrapper reaches them: a UNet behind a CFG closure, a collaboration's member UNets called from
    its ``predict`` method (compiling the collaboration's own ``forward`` would compile nothing that runs).
    ``within``: only modules that are these or their submodules count (a trainer's trainable modules, not the frozen
    VAE); None: any module with parameters. Attributes of ``fn`` (``prediction_type``, ...) read through. A later
    wrapper of the same networks (the next sampling call) skips the watched eager call.
    """

    def __init__(self, fn: Callable[..., Any], options: CompileOptions, within: Optional[list[nn.Module]] = None):
        self.fn, self.options = fn, options
        self.within = None if within is None else {id(m) for top in within for m in top.modules()}
        self.compiled: Optional[list[nn.Module]] = None

    def __getattr__(self, name: str) -> Any:
        if name in ("fn", "options", "within", "compiled"):
            raise AttributeError(name)
        return getattr(self.fn, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is not None:
            return self.fn(*args, **kwargs)
        held = reachable_modules(self.fn)
        if held and all(m in _probed for m in held):  # a later run of the same networks: no eager first step
            self.compiled = []
            return self.fn(*args, **kwargs)
        with outermost_calls(self.within) as called:
            out = self.fn(*args, **kwargs)
        self.compiled = [m for m in called if compile_module(m, self.options)]
        for module in held:
            _probed[module] = None
        return out


@contextlib.contextmanager
def outermost_calls(within: Optional[set[int]] = None) -> Iterator[list[nn.Module]]:
    """Inside: the modules (with parameters, in ``within`` if given) called while no other such module is running,
    in call order, each once."""
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    called: list[nn.Module] = []
    depth = [0]

    def counts(module: nn.Module) -> bool:
        return (within is None or id(module) in within) and _has_parameters(module)

    def enter(module: nn.Module, args: Any) -> None:
        if counts(module):
            if depth[0] == 0 and all(m is not module for m in called):
                called.append(module)
            depth[0] += 1

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        if counts(module):
            depth[0] -= 1

    # Modules compiled earlier run eagerly while the hooks are on: a compiled graph guards on the global hooks and
    # would recompile (with the hooks traced in) for this one call.
    paused = {m: m._compiled_call_impl for m in list(_compiled_modules) if m._compiled_call_impl is not None}
    for module in paused:
        module._compiled_call_impl = None
    handles = [register_module_forward_pre_hook(enter), register_module_forward_hook(leave, always_call=True)]
    try:
        yield called
    finally:
        for handle in handles:
            handle.remove()
        for module, call in paused.items():
            if module._compiled_call_impl is None:
                module._compiled_call_impl = call


def reachable_modules(obj: Any, max_depth: int = 4) -> list[nn.Module]:
    """The outermost ``nn.Module`` objects with parameters a callable holds, through attributes, slots, containers,
    bound methods and closures (how denoiser wrappers hold their networks); used to recognise a later run of the
    same networks, whose first call then needs no watching."""
    found: list[nn.Module] = []
    seen: set[int] = set()

    def visit(value: Any, depth: int) -> None:
        if value is None or id(value) in seen or depth > max_depth:
            return
        seen.add(id(value))
        if isinstance(value, nn.Module):
            if _has_parameters(value):
                found.append(value)
            return
        if isinstance(value, (torch.Tensor, str, bytes, int, float, bool, complex, type)):
            return
        if isinstance(value, dict):
            children = list(value.values())
        elif isinstance(value, (list, tuple, set, frozenset)):
            children = list(value)
        else:
            children = [getattr(value, "__self__", None), getattr(value, "func", None)]
            for cell in getattr(value, "__closure__", None) or ():
                try:
                    children.append(cell.cell_contents)
                except ValueError:  # an empty cell
                    pass
            if hasattr(value, "__dict__"):
                children.extend(vars(value).values())
            for slot in getattr(type(value), "__slots__", ()):
                if isinstance(slot, str):
                    children.append(getattr(value, slot, None))
        for child in children:
            visit(child, depth + 1)

    visit(obj, 0)
    return found


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())
