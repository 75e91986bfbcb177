"""One named diffusers hook on a plain module, put on and taken off leaving the module as it was.

Used by the engine (the guided step around a denoiser) and by the capture (the probe around the SAG layer).
`HookRegistry.remove_hook` puts back the forward it wrapped as an instance attribute; on a module that had no
instance-level forward before its hook, that bound method is dropped again, so the module looks its forward up
on its class (a later class-level patch, another library's, is then seen)."""
from __future__ import annotations

import torch
from diffusers.hooks import HookRegistry, ModelHook


class NamedHook(ModelHook):
    """A ModelHook that remembers whether its module had an instance-level forward before it."""

    had_forward = False


def get(module: torch.nn.Module, name: str) -> NamedHook | None:
    """The hook `name` on module, or None."""
    registry = vars(module).get("_diffusers_hook")
    return None if registry is None else registry.get_hook(name)


def register(module: torch.nn.Module, hook: NamedHook, name: str) -> None:
    hook.had_forward = "forward" in vars(module)
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)


def unregister(module: torch.nn.Module, name: str) -> None:
    """Takes the hook `name` off module (a no-op without one)."""
    hook = get(module, name)
    if hook is None:
        return
    registry = vars(module)["_diffusers_hook"]
    registry.remove_hook(name, recurse=False)
    forward = vars(module).get("forward")
    if not hook.had_forward and not registry.hooks and getattr(forward, "__self__", None) is module \
            and callable(getattr(forward, "__func__", None)):
        del module.forward


# diffusers' caches (diffusers/hooks/*.py, `denoiser.enable_cache(...)`): they reuse activations across the
# denoiser's calls, so SAG's extra forward would be served another call's attention (and would shift their skip
# schedules). Matched by the names their hooks register under.
CACHE_HOOK_PREFIXES = ("pyramid_attention_broadcast", "faster_cache", "fbc_", "mag_cache", "sea_cache", "taylorseer",
                       "text_kv_cache")


def cache_hooks(model: torch.nn.Module) -> list[str]:
    """The names of diffusers cache hooks on model or any of its submodules (empty: none)."""
    names = set()
    for module in model.modules():
        registry = vars(module).get("_diffusers_hook")
        if registry is not None:
            names.update(n for n in registry.hooks if n.startswith(CACHE_HOOK_PREFIXES))
    if not names and getattr(model, "_cache_config", None) is not None:  # CacheMixin.enable_cache's record
        names.add(type(model._cache_config).__name__)
    return sorted(names)


def refuse_caches(model: torch.nn.Module, where: str) -> None:
    """Raises ValueError naming `where` (e.g. "pipe.transformer") if a diffusers cache is on model."""
    names = cache_hooks(model)
    if names:
        raise ValueError(f"{where} has a diffusers cache enabled ({', '.join(names)}): it reuses activations across "
                         "the denoiser's calls, so SAG's extra forward would be built from another call's attention; "
                         "call its disable_cache() (or remove its cache hooks) to use SAG")
