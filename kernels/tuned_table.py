"""Persisted autotune results: a JSON table per GPU model, consulted before ``triton.autotune``.

Tables are looked for in the user's cache folder (``$XDG_CACHE_HOME/dynconv/tuned`` or
``~/.cache/dynconv/tuned``: where the sweep CLI, ``python -m dynconv.autotune sweep``, writes by
default), then in ``tuned/`` next to this file (shipped as package data): the first table found
for the device is used. At run time a kernel wrapped with :func:`with_tuned_table` looks its
launch up by the exact autotune key; on a hit it launches the tuned config directly (no
benchmarking), otherwise the wrapped ``triton.autotune`` runs as usual. A table's
``strategies`` section holds measured strategy choices per call key (:func:`lookup_strategy`,
read by ``dynconv.backends.triton.strategy``).

- ``DYNCONV_TUNED=0`` turns the table off. ``DYNCONV_TUNED_DIR`` reads tables in that folder
  only.
- A table written by another Triton version (major.minor) or for another device is ignored with
  a warning: configs are only trusted where they were measured.
- ``<device>`` is the GPU name in lower case with runs of other characters as ``_`` (e.g.
  ``nvidia_h200``); under Triton's interpreter (CPU tensors) it is ``interpreter``.

Hooking a kernel in is one line where its autotuner is defined::

    conv_fwd_tuned = with_tuned_table("conv_fwd", triton.autotune(...)(conv_fwd_kernel))

The wrapper keeps the autotuner's ``kernel[grid](*args, **kwargs)`` call form.
"""

from __future__ import annotations

import json
import os
import re
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

FORMAT_VERSION = 1
ENV_DISABLE = "DYNCONV_TUNED"
ENV_DIR = "DYNCONV_TUNED_DIR"
INTERPRETER_DEVICE = "interpreter"

_TABLES: dict[str, dict | None] = {}
_LOCK = threading.Lock()
_FORCED = threading.local()


def package_dir() -> str:
    """The tables shipped with the package (``tuned/`` beside this file)."""
    return os.path.join(os.path.dirname(__file__), "tuned")


def user_dir() -> str:
    """The user's own tables: ``$XDG_CACHE_HOME/dynconv/tuned`` or ``~/.cache/dynconv/tuned``."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "dynconv", "tuned")


def search_dirs() -> list[str]:
    """Where tables are looked for, in order: ``$DYNCONV_TUNED_DIR`` alone, else the user's
    folder then the package's."""
    if os.environ.get(ENV_DIR):
        return [os.environ[ENV_DIR]]
    return [user_dir(), package_dir()]


def default_dir() -> str:
    """Where a new table is written: ``$DYNCONV_TUNED_DIR`` or the user's folder."""
    return os.environ.get(ENV_DIR) or user_dir()


def enabled() -> bool:
    return os.environ.get(ENV_DISABLE, "1").strip().lower() not in ("0", "false", "off", "no")


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


_DEVICE_IDS: dict[int, tuple[str, str]] = {}


def device_id(tensor_device) -> tuple[str, str]:
    """(file slug, human device name) of the device a launch runs on."""
    if getattr(tensor_device, "type", "cpu") != "cuda":
        return INTERPRETER_DEVICE, "Triton interpreter (CPU)"
    import torch

    index = tensor_device.index if tensor_device.index is not None else torch.cuda.current_device()
    if index not in _DEVICE_IDS:
        name = torch.cuda.get_device_name(index)
        _DEVICE_IDS[index] = (slug(name), name)
    return _DEVICE_IDS[index]


def triton_version() -> str:
    import triton

    return triton.__version__


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split("+")[0].split(".")[:2])


def table_path(device_slug: str, folder: str | None = None) -> str:
    return os.path.join(folder or default_dir(), f"{device_slug}.json")


def check_table(table: Any, device_name: str, path: str) -> str | None:
    """Why ``table`` must not be trusted here, or None if it may be used."""
    if not isinstance(table, dict) or table.get("format") != FORMAT_VERSION:
        return f"{path} is not a format-{FORMAT_VERSION} tuned table"
    if not isinstance(table.get("kernels"), dict):
        return f"{path} has no 'kernels' mapping"
    if not isinstance(table.get("strategies", {}), dict) or not all(
            isinstance(v, dict) for v in table.get("strategies", {}).values()):
        return f"{path}: 'strategies' must map 'forward' / 'backward' to {{key: entry}}"
    if _major_minor(str(table.get("triton", ""))) != _major_minor(triton_version()):
        return (f"{path} was tuned with Triton {table.get('triton')!r}, this is Triton "
                f"{triton_version()}")
    if table.get("device") != device_name:
        return f"{path} was tuned on {table.get('device')!r}, this is {device_name!r}"
    return None


def load_table(device_slug: str, device_name: str, folder: str | None = None) -> dict | None:
    """The validated table for a device, or None (missing, unreadable or untrusted: warned)."""
    path = table_path(device_slug, folder)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            table = json.load(f)
    except (OSError, ValueError) as exc:
        warnings.warn(f"dynconv: ignoring tuned table {path}: {exc}", RuntimeWarning,
                      stacklevel=3)
        return None
    reason = check_table(table, device_name, path)
    if reason:
        warnings.warn(f"dynconv: ignoring tuned table: {reason}; kernels will autotune "
                      f"(re-run `python -m dynconv.autotune sweep` to rebuild it)",
                      RuntimeWarning, stacklevel=3)
        return None
    return table


def table_for(tensor_device) -> dict | None:
    """The (cached) table of the device a launch runs on; None when off or absent."""
    if not enabled():
        return None
    device_slug, name = device_id(tensor_device)
    folders = search_dirs()
    cache_key = f"{'|'.join(folders)}|{device_slug}"
    with _LOCK:
        if cache_key not in _TABLES:
            _TABLES[cache_key] = next(
                (t for t in (load_table(device_slug, name, f) for f in folders) if t), None)
        return _TABLES[cache_key]


def clear_cache() -> None:
    """Forget loaded tables (after writing one, or when the environment changed)."""
    with _LOCK:
        _TABLES.clear()


def make_key(arg_names, key_names, args, kwargs) -> str:
    """The autotune key of one launch as text: key arguments, then every tensor's dtype.

    Built like ``triton.autotune``'s own key, so one entry answers exactly the launches that
    would share one autotuner cache entry.
    """
    named = dict(zip(arg_names, args, strict=False))
    named.update({k: v for k, v in kwargs.items() if k in arg_names})
    parts = [f"{name}={named[name]}" for name in key_names if name in named]
    dtypes = [str(v.dtype).replace("torch.", "") for v in named.values() if hasattr(v, "dtype")]
    return ";".join(parts) + "|" + ",".join(dtypes)


def lookup(kernel_name: str, key: str, tensor_device=None) -> dict | None:
    """The tuned launch config for ``kernel_name`` and ``key``: ``{"kwargs": {...},
    "num_warps": n, "num_stages": s}``, or None."""
    table = table_for(tensor_device)
    if table is None:
        return None
    entry = table["kernels"].get(kernel_name, {}).get(key)
    return None if entry is None else entry.get("config")


def lookup_strategy(kind: str, key: str, tensor_device=None) -> str | None:
    """The measured strategy of ``kind`` ("forward" or "backward") for a call key, or None."""
    table = table_for(tensor_device)
    if table is None:
        return None
    entry = table.get("strategies", {}).get(kind, {}).get(key)
    return None if entry is None else entry.get("strategy")


def config_to_dict(config) -> dict:
    """A ``triton.Config`` as JSON-able data."""
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps,
            "num_stages": config.num_stages}


def config_from_dict(data: dict):
    import triton

    return triton.Config(dict(data["kwargs"]), num_warps=int(data["num_warps"]),
                         num_stages=int(data["num_stages"]))


def config_label(data: dict) -> str:
    kwargs = ",".join(f"{k}={v}" for k, v in sorted(data["kwargs"].items()))
    return f"{kwargs},warps={data['num_warps']},stages={data['num_stages']}"


@contextmanager
def forcing(kernel_name: str, config) -> Iterator[list]:
    """Within the block, launches of ``kernel_name`` use ``config`` and bypass both the table
    and the autotuner. ``config`` is a ``triton.Config``, or a function of the launch
    ``(named positional arguments, keyword arguments) -> triton.Config`` (a choice that depends
    on the launch, e.g. the first of the kernel's own pruned candidates). Yields a list that
    collects, for each launch, ``(key, named positional arguments, keyword arguments)``.

    The sweep uses it to time candidates through the real launchers.
    """
    forced = getattr(_FORCED, "configs", {})
    previous = forced.get(kernel_name)
    launches: list[tuple] = []
    forced[kernel_name] = (config, launches)
    _FORCED.configs = forced
    try:
        yield launches
    finally:
        if previous is None:
            forced.pop(kernel_name, None)
        else:
            forced[kernel_name] = previous


class TunedKernel:
    """``triton.autotune`` kernel wrapped so that a tuned-table entry is used first.

    ``last_source`` says what the latest launch used: ``"table"``, ``"forced"`` or
    ``"autotune"``; ``last_key`` its key and ``last_config`` the config dict (table/forced).
    """

    def __init__(self, name: str, autotuner):
        self.name = name
        self.autotuner = autotuner
        self.arg_names = list(autotuner.arg_names)
        self.key_names = list(autotuner.keys)
        self.last_source: str | None = None
        self.last_key: str | None = None
        self.last_config: dict | None = None

    def __getattr__(self, attr):
        # configs, cache, best_config, fn... stay reachable as on the autotuner
        if attr == "autotuner":  # not set yet (copy / unpickling): no recursion
            raise AttributeError(attr)
        return getattr(self.autotuner, attr)

    def _device(self, args):
        for value in args:
            if hasattr(value, "device") and hasattr(value, "dtype"):
                return value.device
        return None

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            key = make_key(self.arg_names, self.key_names, args, kwargs)
            forced = getattr(_FORCED, "configs", {}).get(self.name)
            self.last_key = key
            if forced is not None:
                config, launches = forced
                named = dict(zip(self.arg_names, args, strict=False))
                launches.append((key, named, dict(kwargs)))
                if callable(config):
                    config = config(named, dict(kwargs))
                self.last_source, self.last_config = "forced", config_to_dict(config)
                return self._run(config, grid, args, kwargs)
            data = lookup(self.name, key, self._device(args))
            if data is not None:
                self.last_source, self.last_config = "table", data
                return self._run(config_from_dict(data), grid, args, kwargs)
            self.last_source, self.last_config = "autotune", None
            return self.autotuner[grid](*args, **kwargs)

        return launch

    def _run(self, config, grid, args, kwargs):
        if config.pre_hook is not None:
            named = dict(zip(self.arg_names, args, strict=False))
            config.pre_hook({**named, **kwargs, **config.all_kwargs()})
        return self.autotuner.fn.run(*args, grid=grid, warmup=False, **kwargs,
                                     **config.all_kwargs())


def with_tuned_table(name: str, autotuner) -> TunedKernel:
    """Wrap a ``triton.autotune`` kernel so the tuned table for ``name`` is consulted first."""
    return TunedKernel(name, autotuner)
