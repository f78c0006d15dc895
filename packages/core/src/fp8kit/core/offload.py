"""Models dispatched by accelerate (`device_map="auto"`, `cpu_offload`, `disk_offload`, `dispatch_model`).

An offloaded module keeps its parameters on the meta device; an accelerate `AlignDevicesHook`
(``module._hf_hook``, offload=True) loads them from its `weights_map` (CPU memory or a disk
memmap) onto the hook's execution device for each forward and puts them back to meta after it.
These helpers let quantization and saving see the real tensors one module at a time, through the
same hooks, without importing accelerate unless a model uses it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, ModelLoadError

__all__ = [
    "offload_hook",
    "is_offloaded",
    "materialized",
    "reoffload_like",
    "offloaded_tensor",
    "execution_device",
    "dispatch",
    "device_summary",
    "module_device",
    "resolve_device",
]


def resolve_device(device: str | torch.device | None, what: str = "device") -> torch.device:
    """`device` as a torch.device this machine has: None means "cuda" when available, else "cpu".

    A name torch does not know ("tpu", "cuda:x"), a CUDA device on a machine without one, or a GPU
    index past the last is a `ConfigError` naming `what` (the argument) and the devices there are.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise ConfigError(f"{what}={device!r}: expected a device name such as 'cpu' or 'cuda:0'")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"{what}={device!r} is not a device name ('cpu', 'cuda', 'cuda:0', ...): {exc}") from None
    if resolved.type == "cpu" or resolved.type == "meta":
        return resolved
    if resolved.type != "cuda":
        raise ConfigError(f"{what}={device!r}: fp8kit runs on 'cpu' or 'cuda' devices, not {resolved.type!r}")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ConfigError(f"{what}={device!r}: this machine has no CUDA GPU usable by torch; use 'cpu'")
    if resolved.index is not None and resolved.index >= count:
        raise ConfigError(f"{what}={device!r}: there are {count} CUDA device(s) (cuda:0 .. cuda:{count - 1})")
    return resolved


def _hooks(module: nn.Module) -> list:
    """The accelerate hooks on `module` (a SequentialHook unpacked), or []."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", [hook]))


def offload_hook(module: nn.Module):
    """The hook that offloads `module`'s own tensors (accelerate `AlignDevicesHook` with offload=True), or None."""
    for hook in _hooks(module):
        if getattr(hook, "offload", False) and getattr(hook, "weights_map", None) is not None:
            return hook
    return None


def is_offloaded(module: nn.Module) -> bool:
    """True when `module`'s own tensors live in an accelerate offload map (meta until its forward)."""
    return offload_hook(module) is not None


@contextlib.contextmanager
def materialized(module: nn.Module) -> Iterator[object]:
    """Within the block, an offloaded `module` holds its real tensors on the hook's execution device.

    Yields the offload hook (None for a module that is not offloaded, which is left untouched).
    Uses the hook's own pre_forward / post_forward, so exactly one module is resident at a time.
    """
    hook = offload_hook(module)
    if hook is None:
        yield None
        return
    hook.pre_forward(module)
    try:
        yield hook
    finally:
        hook.post_forward(module, None)


def reoffload_like(new: nn.Module, hook: object) -> nn.Module:
    """Offload `new` (parameters and buffers) the way `hook` offloaded the module it replaces.

    Its tensors are copied to CPU memory as the weights map and set to meta; the forward runs on
    `hook.execution_device`, as the original module did.
    """
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    add_hook_to_module(
        new,
        AlignDevicesHook(
            execution_device=getattr(hook, "execution_device", None),
            offload=True,
            offload_buffers=True,
            skip_keys=getattr(hook, "skip_keys", None),
        ),
    )
    return new


def offloaded_tensor(model: nn.Module, name: str) -> torch.Tensor | None:
    """The real value of the state-dict entry `name` that is on meta because it is offloaded, or None.

    Looks in the weights map of the offload hook of the owning module or of an ancestor (hooks with
    `place_submodules` offload a whole block). Disk-offloaded values come back as memmap-backed CPU tensors.
    """
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        try:
            module = model.get_submodule(".".join(parts[:i]))
        except AttributeError:
            continue
        hook = offload_hook(module)
        if hook is None:
            continue
        try:  # not `in`: on a lazy (disk) map that would read the tensor twice
            return hook.weights_map[".".join(parts[i:])]
        except KeyError:
            continue
    return None


def _hook_device(module: nn.Module) -> torch.device | None:
    """The execution device of `module`'s own accelerate hooks, or None."""
    for hook in _hooks(module):
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    return None


def execution_device(model: nn.Module) -> torch.device:
    """Where inputs of `model` should go: the top-level hook's execution device, else the first real
    tensor's device, else the first submodule hook's execution device (CPU when there is none)."""
    device = _hook_device(model)
    if device is not None:
        return device
    for tensor in [*model.parameters(), *model.buffers()]:
        if not tensor.is_meta:
            return tensor.device
    for module in model.modules():
        device = _hook_device(module)
        if device is not None:
            return device
    return torch.device("cpu")


def dispatch(
    model: nn.Module,
    device_map: str | dict[str, Any],
    *,
    max_memory: dict[int | str, int | str] | None = None,
    offload_folder: str | os.PathLike | None = None,
    where: str = "model",
) -> nn.Module:
    """Spread `model` (real tensors on the CPU) over devices with accelerate, in place; returns it.

    device_map: "auto" / "balanced" / "balanced_low_0" / "sequential" (planned from `max_memory`, at most one
        decoder block per device: `model._no_split_modules`), or an explicit {module name: device} map.
    max_memory: {GPU index or "cpu": bytes or "70GiB"}; None = what is free.
    Layers that fit on no GPU go to the CPU, then to disk under `offload_folder`; ModelLoadError (naming
    `where`) when the plan needs disk and no folder is given. Sets `model.hf_device_map`.
    """
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if isinstance(device_map, str):
        if device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
            raise ModelLoadError(
                f"{where}: device_map {device_map!r} is not 'auto', 'balanced', 'balanced_low_0', 'sequential' or a "
                "{module name: device} map"
            )
        no_split = list(getattr(model, "_no_split_modules", None) or [])
        try:
            if device_map != "sequential":
                max_memory = get_balanced_memory(
                    model, max_memory=max_memory, no_split_module_classes=no_split, low_zero=device_map == "balanced_low_0"
                )
            device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
        except (ValueError, TypeError, KeyError) as exc:
            raise ModelLoadError(f"{where}: cannot plan a device map (max_memory={max_memory!r}): {exc}") from exc
    devices = set(device_map.values())
    if "disk" in devices and offload_folder is None:
        raise ModelLoadError(
            f"{where}: does not fit in the GPUs and CPU memory allowed (max_memory={max_memory!r}): "
            f"{sum(d == 'disk' for d in device_map.values())} module(s) would go to disk; pass an offload folder "
            "(offload_folder= / --offload-folder) or allow more memory"
        )
    try:
        dispatch_model(
            model,
            device_map=device_map,
            offload_dir=None if offload_folder is None else str(offload_folder),
            offload_buffers=True,  # FP8Linear's weight and scales are buffers: offload them like parameters
            skip_keys=getattr(model, "_skip_keys_device_placement", None),
        )
    except (ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"{where}: cannot dispatch over {sorted(map(str, devices))}: {exc}") from exc
    model.hf_device_map = dict(device_map)
    return model


def device_summary(model: nn.Module, names: list[str]) -> dict[str, int]:
    """How many of the modules `names` of `model` run on each device ('cuda:1', 'cpu', ...): for progress logs."""
    counts: dict[str, int] = {}
    modules = dict(model.named_modules())
    for name in names:
        module = modules.get(name)
        if module is None:
            continue
        device = module_device(module)
        counts[device] = counts.get(device, 0) + 1
    return counts


def module_device(module: nn.Module) -> str:
    """Where `module` computes: its offload hook's execution device, else its first real tensor's device."""
    hook = offload_hook(module)
    if hook is not None and getattr(hook, "execution_device", None) is not None:
        device = hook.execution_device
        return str(torch.device(device if not isinstance(device, int) else f"cuda:{device}"))
    for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
        if not tensor.is_meta:
            return str(tensor.device)
    return "meta"
