"""Activation (gradient) checkpointing for any module: the model's own switch, else its repeated blocks.

diffusers models (``enable_gradient_checkpointing``) and transformers models (``gradient_checkpointing_enable``)
have a switch; the project's own modules (ContextDiff's ``RelationalNet``, the Shifted prior, CoDiff's dynamic
diffusers, ...) are built from ``nn.ModuleList`` / ``nn.ModuleDict`` stacks of blocks. For those, every block's
forward runs under ``torch.utils.checkpoint.checkpoint(use_reentrant=False)`` in training with autograd on: its
activations are freed after the forward and recomputed in the backward (the RNG state is replayed, so dropout draws
the same mask). The block gets a subclass of its own class (same name, same parameters, same state_dict keys), so
checkpoints, EMA and ``save_pretrained`` see the same module; ``copy.deepcopy`` keeps the behaviour.

A module whose forward reads state set from outside the block for the duration of one call (forward hooks fed by
attributes, as SDG's FiLM-modulated CLIP) must not be block-checkpointed, since the recomputation in the backward
happens after that state is gone: such a module defines ``enable_gradient_checkpointing`` itself.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


_CHECKPOINTED_CLASSES: dict[type, type] = {}


def _own_switch(module: nn.Module):
    """The module's own enabling method if it has a working one, else None."""
    if hasattr(module, "enable_gradient_checkpointing"):
        # diffusers' ModelMixin has the method on every model but refuses when the class does not support it
        if getattr(type(module), "_supports_gradient_checkpointing", True):
            return module.enable_gradient_checkpointing
        return None
    if hasattr(module, "gradient_checkpointing_enable") and getattr(module, "supports_gradient_checkpointing", False):
        return module.gradient_checkpointing_enable
    return None


def _checkpointed_class(cls: type) -> type:
    if cls not in _CHECKPOINTED_CLASSES:

        def forward(self, *args, **kwargs):
            if self.training and torch.is_grad_enabled():
                return checkpoint(super(sub, self).forward, *args, use_reentrant=False, **kwargs)
            return super(sub, self).forward(*args, **kwargs)

        sub = type(cls.__name__, (cls,), {"forward": forward, "_gradient_checkpointed": True,
                                          "__module__": cls.__module__, "__qualname__": cls.__qualname__})
        _CHECKPOINTED_CLASSES[cls] = sub
    return _CHECKPOINTED_CLASSES[cls]


def checkpoint_block(block: nn.Module) -> None:
    """Make ``block``'s forward checkpointed (in place; idempotent)."""
    if not getattr(block, "_gradient_checkpointed", False):
        block.__class__ = _checkpointed_class(type(block))


def enable_gradient_checkpointing(module: nn.Module, prefix: str = "") -> list[str]:
    """Turn on checkpointing in ``module``; returns what is checkpointed (names of the parts), [] if nothing."""
    switch = _own_switch(module)
    if switch is not None:
        switch()
        return [prefix or type(module).__name__]
    done: list[str] = []
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            blocks = child.items() if isinstance(child, nn.ModuleDict) else enumerate(child)
            wrapped = 0
            for key, block in blocks:
                if _own_switch(block) is not None:
                    done += enable_gradient_checkpointing(block, f"{path}.{key}")
                elif any(p.requires_grad for p in block.parameters()):
                    checkpoint_block(block)
                    wrapped += 1
            if wrapped:
                done.append(f"{path} ({wrapped} blocks)")
        else:
            done += enable_gradient_checkpointing(child, path)
    return done
