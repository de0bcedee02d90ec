"""The engines accelerate runs the trainer on: plain, DDP, FSDP (1 and 2), DeepSpeed ZeRO; what each needs from us.

:class:`common.train.Trainer` asks this module which engine accelerate selected (:func:`engine_of`), prints it in
the run header (:func:`describe_engine`), and, under an engine that shards parameters or wraps one model per
engine (FSDP, DeepSpeed), trains every trainable module inside one :class:`ModuleBundle` so that a single
``accelerator.prepare`` call covers them (accelerate's FSDP2 and DeepSpeed paths take one model per prepare). The
loss function keeps calling ``ctx.models[name](...)``: a :class:`Routed` handle sends the call through the
prepared bundle's ``forward``, where FSDP gathers the shards and DeepSpeed runs its hooks.

Full weights of a sharded model exist on no process; :func:`full_modules` rebuilds plain modules on the main
process from ``accelerator.get_state_dict`` (a collective: every process enters, the main process receives)
and a weightless copy of each module taken before sharding (:func:`weightless_copy`).
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import DistributedType
from torch import nn

from common.errors import UserError


logger = logging.getLogger(__name__)

# Blocks of this project's models (and of the diffusers / transformers models they build on) that FSDP wraps as
# one unit each: a block's weights are gathered right before its forward and freed after it, which is what bounds
# the memory. Names absent from a model are skipped (accelerate would refuse them).
FSDP_BLOCK_CLASSES = (
    "BasicTransformerBlock",  # diffusers attention blocks (UNet2DConditionModel, Transformer2DModel)
    "ResnetBlock2D",  # diffusers UNet res blocks
    "CLIPEncoderLayer",  # transformers CLIP towers
    "T5Block",  # transformers T5
    "RelationalBlock",  # contextdiff adapter
    "PriorBlock",  # shifted prior
    "FlatResBlock",  # versatile flat res blocks
    "ResBlock",  # sdg ADM UNet
    "AttentionBlock",  # sdg ADM UNet
)

ENGINE_PLAIN, ENGINE_DDP, ENGINE_FSDP, ENGINE_DEEPSPEED = "plain", "DDP", "FSDP", "DeepSpeed"


def _env_true(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class Engine:
    """What accelerate runs: ``kind`` (plain/DDP/FSDP/DeepSpeed) and the facts the trainer branches on."""

    kind: str
    num_processes: int
    fsdp_version: int | None = None
    zero_stage: int | None = None

    @property
    def bundles_models(self) -> bool:
        """Trainable modules go into one ModuleBundle (one prepare): FSDP and DeepSpeed."""
        return self.kind in (ENGINE_FSDP, ENGINE_DEEPSPEED)

    @property
    def shards_parameters(self) -> bool:
        """No process holds the full weights between steps: FSDP, DeepSpeed ZeRO-3."""
        return self.kind == ENGINE_FSDP or (self.kind == ENGINE_DEEPSPEED and (self.zero_stage or 0) >= 3)


def engine_of(accelerator: Any) -> Engine:
    kind = accelerator.distributed_type
    n = accelerator.num_processes
    if kind == DistributedType.FSDP:
        return Engine(ENGINE_FSDP, n, fsdp_version=int(getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1)))
    if kind == DistributedType.DEEPSPEED:
        return Engine(ENGINE_DEEPSPEED, n, zero_stage=int(accelerator.state.deepspeed_plugin.zero_stage))
    if kind == DistributedType.NO or n == 1:
        return Engine(ENGINE_PLAIN, n)
    return Engine(ENGINE_DDP, n)


def describe_engine(accelerator: Any, engine: Engine) -> str:
    """One line for the run header, e.g. ``FSDP2 full shard, 4 processes (nccl), auto-wrap ResnetBlock2D``."""
    state = accelerator.state
    backend = getattr(state, "backend", None) or "-"
    where = f"{engine.num_processes} process{'es' if engine.num_processes != 1 else ''} ({backend}, {accelerator.device.type})"
    if engine.kind == ENGINE_FSDP:
        plugin = state.fsdp_plugin
        if engine.fsdp_version == 2:
            sharding = "full shard" if plugin.reshard_after_forward else "shard grad/optimizer (no reshard)"
        else:
            sharding = str(getattr(plugin.sharding_strategy, "name", plugin.sharding_strategy)).lower().replace("_", " ")
        names = plugin.transformer_cls_names_to_wrap
        wrap = f"auto-wrap {','.join(names)}" if names else "whole model as one unit"
        return (
            f"FSDP{engine.fsdp_version} {sharding}, {where}, {wrap}, "
            f"checkpoints {getattr(plugin.state_dict_type, 'name', plugin.state_dict_type)}"
        )
    if engine.kind == ENGINE_DEEPSPEED:
        return f"DeepSpeed ZeRO-{engine.zero_stage}, {where}"
    if engine.kind == ENGINE_DDP:
        return f"DDP, {where}"
    return f"plain (no distributed wrapper), {where}"


def check_requested_engine(accelerator: Any) -> None:
    """Make what the launcher asked for (ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED) what runs, or refuse.

    accelerate applies ``ACCELERATE_USE_FSDP`` only to accelerator devices: with ``cpu=True`` (which the trainer
    needs on a machine without GPU to join torchrun's process group) it sets up ``MULTI_CPU`` and the model trains
    as DDP while the user believes it is sharded. FSDP2 (``fully_shard``) runs on CPU over gloo, so there the
    trainer switches accelerate to FSDP itself; FSDP1 cannot (torch refuses a CPU ``device_id``) and DeepSpeed
    needs CUDA: both are refused in one line. Any other mismatch (a request that accelerate ignored) is refused too.
    """
    kind = accelerator.distributed_type
    if _env_true("ACCELERATE_USE_DEEPSPEED") and kind != DistributedType.DEEPSPEED:
        raise UserError(
            f"DeepSpeed was requested (ACCELERATE_USE_DEEPSPEED=true) but accelerate set up {kind.value}: DeepSpeed "
            "needs CUDA GPUs and the deepspeed package; on CPU use FSDP (configs/accelerate/fsdp.yaml) or DDP"
        )
    if not _env_true("ACCELERATE_USE_FSDP") or kind == DistributedType.FSDP:
        return
    if accelerator.num_processes == 1:
        logger.warning("FSDP was requested but this run has one process: nothing to shard, training unsharded")
        return
    if kind != DistributedType.MULTI_CPU:
        raise UserError(
            f"FSDP was requested (ACCELERATE_USE_FSDP=true) but accelerate set up {kind.value}; launch with "
            "`accelerate launch --config_file configs/accelerate/fsdp.yaml` on GPUs"
        )
    from accelerate.state import PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin

    if os.environ.get("FSDP_VERSION", "2").strip() != "2":
        raise UserError(
            "FSDP1 cannot run on CPU (torch refuses its cpu device_id); set fsdp_version: 2 in the accelerate config "
            "(FSDP_VERSION=2) to shard on CPU over gloo"
        )
    os.environ.setdefault("FSDP_VERSION", "2")
    os.environ.setdefault("FSDP_RESHARD_AFTER_FORWARD", "true")
    plugin = FullyShardedDataParallelPlugin()
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    # AcceleratorState re-reads the distributed type from PartialState whenever it is constructed again: set both.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    logger.info("FSDP requested on CPU: accelerate would train DDP here; switched it to FSDP2 over gloo")


def prepare_fsdp_plugin(accelerator: Any, bundle: nn.Module) -> None:
    """Auto-wrap the project's blocks present in ``bundle``; checkpoints as FULL_STATE_DICT.

    Class names from the accelerate config that the model lacks are dropped with a warning (accelerate would
    raise); without any, :data:`FSDP_BLOCK_CLASSES` present in the model are used. Checkpoints are written as
    full state dicts (torch files read back with ``weights_only=True``): the sharded format of
    ``torch.distributed.checkpoint`` reads its metadata with pickle.
    """
    from torch.distributed.fsdp.fully_sharded_data_parallel import StateDictType
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    plugin = accelerator.state.fsdp_plugin
    present = {type(m).__name__ for m in bundle.modules()}
    asked = list(plugin.transformer_cls_names_to_wrap or [])
    missing = [n for n in asked if n not in present]
    if missing:
        logger.warning("FSDP auto-wrap: %s not in this model, skipped", ", ".join(missing))
    names = [n for n in asked if n in present] or [n for n in FSDP_BLOCK_CLASSES if n in present]
    unset = "FSDP_AUTO_WRAP_POLICY" not in os.environ and plugin.auto_wrap_policy is None
    if plugin.auto_wrap_policy is transformer_auto_wrap_policy or unset:  # an explicit NO_WRAP / SIZE_BASED stays
        plugin.auto_wrap_policy = transformer_auto_wrap_policy if names else None
        plugin.transformer_cls_names_to_wrap = names or None
    if plugin.state_dict_type != StateDictType.FULL_STATE_DICT:
        asked_sharded = os.environ.get("FSDP_STATE_DICT_TYPE", "").upper().startswith("SHARDED")
        (logger.warning if asked_sharded else logger.info)(
            "FSDP checkpoints: writing FULL_STATE_DICT instead of %s (the sharded format is read back with pickle)",
            getattr(plugin.state_dict_type, "name", plugin.state_dict_type),
        )
        plugin.state_dict_config = plugin.optim_state_dict_config = None  # rebuilt for the full type
        plugin.set_state_dict_type("FULL_STATE_DICT")


def refuse_sharded_ema(engine: Engine, use_ema: bool) -> None:
    if use_ema and engine.shards_parameters:
        what = f"FSDP{engine.fsdp_version}" if engine.kind == ENGINE_FSDP else f"DeepSpeed ZeRO-{engine.zero_stage}"
        raise UserError(
            f"--use_ema keeps a full copy of every trained weight on each process, which {what} shards away; "
            "train without --use_ema, or with DDP or DeepSpeed ZeRO-2 (configs/accelerate/deepspeed_zero2.yaml)"
        )


class ModuleBundle(nn.Module):
    """Every trainable module under one root, so that FSDP / DeepSpeed prepare (and shard) them in one call.

    ``bundle(name, *args, **kwargs)`` runs ``bundle.parts[name](*args, **kwargs)``: the call enters the prepared
    root's ``forward``, so FSDP gathers the root's shards and DeepSpeed its parameters around it.
    """

    def __init__(self, modules: Mapping[str, nn.Module]):
        super().__init__()
        self.parts = nn.ModuleDict(dict(modules))

    def forward(self, name: str, *args: Any, bundle_method: str | None = None, **kwargs: Any) -> Any:
        module = self.parts[name]
        return getattr(module, bundle_method)(*args, **kwargs) if bundle_method else module(*args, **kwargs)


def _library_methods() -> frozenset[str]:
    """Names of nn.Module's (and diffusers ModelMixin's) own methods: called directly, never routed."""
    names = set(dir(nn.Module))
    try:
        from diffusers import ModelMixin

        names |= set(dir(ModelMixin))
    except ImportError:  # pragma: no cover - diffusers is a requirement
        pass
    return frozenset(names)


class Routed:
    """``ctx.models[name]`` under FSDP / DeepSpeed: calls go through the prepared bundle's forward.

    ``routed(x)`` runs the module's forward and ``routed.some_loss(x)`` (a method the model class defines itself,
    e.g. a VAE's reconstruction loss) runs that method, both inside the prepared bundle's forward where FSDP gathers
    the shards and DeepSpeed runs its hooks; nn.Module's own methods (``train``, ``parameters``...) and plain
    attributes go straight to the module.
    """

    _direct = None

    def __init__(self, prepared: nn.Module, name: str, module: nn.Module):
        self.__dict__.update(_prepared=prepared, _name=name, _module=module)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._prepared(self._name, *args, **kwargs)

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self.__dict__["_module"], attr)
        if Routed._direct is None:
            Routed._direct = _library_methods()
        if attr.startswith("_") or attr in Routed._direct or not callable(value) or isinstance(value, nn.Module):
            return value

        def through_bundle(*args: Any, **kwargs: Any) -> Any:
            return self._prepared(self._name, *args, bundle_method=attr, **kwargs)

        return through_bundle

    def __repr__(self) -> str:
        return f"Routed({self._name!r} through {type(self._prepared).__name__})"


def weightless_copy(module: nn.Module) -> nn.Module:
    """A deep copy whose parameters and persistent buffers live on the meta device (no memory).

    Non-persistent buffers (never in a state dict, e.g. precomputed positional tables) are copied for real, so a
    copy filled with :func:`fill_from_state_dict` is complete.
    """
    persistent = {id(t) for t in module.state_dict(keep_vars=True).values() if torch.is_tensor(t)}
    memo: dict[int, Any] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) in persistent and id(t) not in memo:
            empty = torch.empty_like(t, device="meta")
            memo[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty
    return copy.deepcopy(module, memo)


def fill_from_state_dict(template: nn.Module, state: Mapping[str, torch.Tensor], device: torch.device) -> nn.Module:
    """A plain module: a copy of ``template`` (from :func:`weightless_copy`) holding ``state``, on ``device``."""
    module = copy.deepcopy(template)
    reference = module.state_dict(keep_vars=True)
    missing = sorted(set(reference) - set(state))
    unexpected = sorted(set(state) - set(reference))
    if missing or unexpected:
        raise RuntimeError(f"gathered state dict does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    typed = {k: v.to(dtype=reference[k].dtype) if v.is_floating_point() else v for k, v in state.items()}
    module.load_state_dict(typed, strict=True, assign=True)
    return module.to(device)


def split_bundle_state(state: Mapping[str, torch.Tensor], names: Iterable[str]) -> dict[str, dict[str, torch.Tensor]]:
    """``{"parts.unet.conv.weight": t}`` -> ``{"unet": {"conv.weight": t}}`` (a gathered ModuleBundle state dict)."""
    out: dict[str, dict[str, torch.Tensor]] = {name: {} for name in names}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        name, _, param = rest.partition(".")
        if head == "parts" and name in out:
            out[name][param] = value
    return out


def full_modules(
    accelerator: Any, prepared_bundle: nn.Module, templates: Mapping[str, nn.Module], device: torch.device
) -> dict[str, nn.Module] | None:
    """Gather the sharded bundle (every process must call) and rebuild plain modules on the main process.

    Returns ``{name: module}`` on the main process (on ``device``, full weights), None on the others.
    """
    state = accelerator.get_state_dict(prepared_bundle)  # collective under FSDP / ZeRO-3
    if not accelerator.is_main_process:
        return None
    parts = split_bundle_state(state, templates)
    return {name: fill_from_state_dict(templates[name], parts[name], device) for name in templates}


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (works for meta and sharded tensors: their global size)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


__all__ = [
    "Engine",
    "FSDP_BLOCK_CLASSES",
    "ModuleBundle",
    "Routed",
    "check_requested_engine",
    "describe_engine",
    "engine_of",
    "fill_from_state_dict",
    "full_modules",
    "module_bytes",
    "prepare_fsdp_plugin",
    "refuse_sharded_ema",
    "split_bundle_state",
    "weightless_copy",
]
