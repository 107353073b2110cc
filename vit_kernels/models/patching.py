"""In-place patching: a module's methods replaced, on that instance only, by fused ones; undone by ``restore``.

``accelerate(model)`` changes no class and copies no tensor: it stores a fused method (``FusedMethod``) in the instance
``__dict__`` of each module it accelerates (the framework's encoder blocks, patch embedding, LayerNorms, head),
which Python finds before the class's own. Everything else stays the framework's: mode, parameters, hooks
(``nn.Module.__call__`` still runs them), FSDP2's per-module hooks, activation checkpointing, ``state_dict``.
A ``copy.deepcopy`` or a pickled copy (``torch.save(model)``) of the model is patched the same way.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

_PATCHES = "_vit_kernels_patches"  # instance attribute: {method name: what the instance dict held before}


class _Missing:
    """'The instance dict held nothing under this name': one object that deepcopy and pickle keep the same, so
    ``restore`` works on a copy of an accelerated model too."""

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return "_MISSING"  # pickled by reference to this module's global

    def __repr__(self) -> str:
        return "<vit_kernels: nothing in the instance dict>"


_MISSING = _Missing()


class FusedMethod:
    """``fn`` bound to one module, like a method, but picklable: ``torch.save(model)`` stores the module-level
    function by name (a bound method would be restored as the class's own method, silently unpatched)."""

    __slots__ = ("fn", "module")

    def __init__(self, fn: Callable, module: nn.Module):
        self.fn, self.module = fn, module

    def __call__(self, *args, **kwargs):
        return self.fn(self.module, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        signature = inspect.signature(self.fn)
        return signature.replace(parameters=list(signature.parameters.values())[1:])

    def __repr__(self) -> str:
        return f"<vit_kernels fused {self.fn.__module__}.{self.fn.__qualname__} of {type(self.module).__name__}>"


def patch(module: nn.Module, name: str, fused: Callable) -> None:
    """Make ``module.<name>`` call ``fused(module, ...)``; the first patch of a name remembers what was there."""
    previous = module.__dict__.setdefault(_PATCHES, {})
    previous.setdefault(name, module.__dict__.get(name, _MISSING))
    object.__setattr__(module, name, FusedMethod(fused, module))


def is_accelerated(model: nn.Module) -> bool:
    """True when ``model`` (or a module inside it) runs patched fused methods."""
    return isinstance(model, nn.Module) and any(_PATCHES in m.__dict__ for m in model.modules())


def restore(model: nn.Module) -> nn.Module:
    """Undo ``vit_kernels.accelerate``: every patched module of ``model`` gets its own methods back.

    Returns ``model`` (the same object). Parameters, buffers and mode are untouched; a model that was never
    accelerated is returned as it is."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"restore expects an nn.Module, got {type(model).__name__}")
    for module in model.modules():
        patches = module.__dict__.pop(_PATCHES, None)
        for name, before in (patches or {}).items():
            if before is _MISSING:
                module.__dict__.pop(name, None)
            else:
                object.__setattr__(module, name, before)
        for key in [k for k in module.__dict__ if k.startswith("vit_kernels_")]:  # patch options
            del module.__dict__[key]
    return model
