"""``rkort.install()``: onnxruntime itself, and optimum whenever it is imported, use rkort.

After ``install()``:

- ``onnxruntime.InferenceSession`` is rkort's session (a subclass of onnxruntime's, so every
  ``isinstance`` check written for onnxruntime still holds) and ``onnxruntime.IOBinding`` rkort's;
- ``onnxruntime.get_available_providers()`` lists ``RKNNExecutionProvider`` first where RKNN can
  run, and ``get_all_providers()`` lists it;
- optimum (optimum-onnx's ``optimum.onnxruntime``) uses them too, whether it was imported before
  ``install()`` or after: the names its modules imported from onnxruntime are rebound, now for the
  modules already loaded, and as each later one is loaded (``modeling_diffusion`` is imported
  lazily, for instance); and optimum's provider check accepts the short name ``"RKNN"``, so
  ``ORTModel*.from_pretrained(path, provider="RKNN")`` works like
  ``provider="RKNNExecutionProvider"``.

Names a program imported from onnxruntime into its own modules before ``install()`` keep the
original objects: call ``install()`` first, or use ``onnxruntime.InferenceSession`` through the
module (``rkort run`` installs before the program starts).
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import logging
import sys
import threading
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import onnxruntime as _ort

from ..providers import get_all_providers, get_available_providers
from ..session import InferenceSession, IOBinding, set_provider_policy
from .defaults import canonical_provider, effective_providers

log = logging.getLogger("rkort")

# Modules whose onnxruntime names are rebound: optimum's, and only those (a program's own
# modules are left alone).
_REBOUND = ("optimum",)
_OPTIMUM_UTILS = "optimum.onnxruntime.utils"
_PATCHED_NAMES = ("InferenceSession", "IOBinding", "get_available_providers", "get_all_providers")


@dataclass
class _Installed:
    ort_originals: dict[str, Any]
    hook: _OptimumImportHook
    #: id(original) -> (original, replacement), for every object rebound in optimum's modules.
    replacements: dict[int, tuple[Any, Any]] = field(default_factory=dict)


_lock = threading.RLock()
_state: _Installed | None = None


def install() -> None:
    """Make onnxruntime, and optimum whenever it is imported, run sessions through rkort.

    Idempotent and independent of import order: call it before or after importing optimum.
    """
    global _state
    with _lock:
        if _state is None:
            _state = _patch()
            set_provider_policy(effective_providers)
            log.debug("rkort.install(): onnxruntime patched")
        if _state.hook not in sys.meta_path:
            sys.meta_path.insert(0, _state.hook)
        _rebind_loaded_optimum()


def uninstall() -> None:
    """Undo :func:`install`: onnxruntime's and optimum's names are onnxruntime's own again.

    Sessions created while installed stay rkort sessions.
    """
    global _state
    with _lock:
        state, _state = _state, None
        if state is None:
            return
        if state.hook in sys.meta_path:
            sys.meta_path.remove(state.hook)
        set_provider_policy(None)
        for name, value in state.ort_originals.items():
            setattr(_ort, name, value)
        back = {id(new): (new, old) for old, new in state.replacements.values()}
        for module in _optimum_modules():
            _swap(module, back)


def is_installed() -> bool:
    """True between :func:`install` and :func:`uninstall`."""
    return _state is not None


def _patch() -> _Installed:
    ort_originals = {name: getattr(_ort, name) for name in _PATCHED_NAMES}
    new = {
        "InferenceSession": InferenceSession,
        "IOBinding": IOBinding,
        "get_available_providers": get_available_providers,
        "get_all_providers": get_all_providers,
    }
    state = _Installed(ort_originals, _OptimumImportHook())
    for name, value in new.items():
        setattr(_ort, name, value)
        state.replacements[id(ort_originals[name])] = (ort_originals[name], value)
    return state


def _accepting_alias(validate: Callable[[str], Any]) -> Callable[[str], Any]:
    """optimum's ``validate_provider_availability``, also accepting the short name "RKNN"."""

    @functools.wraps(validate)
    def validate_provider_availability(provider: str) -> Any:
        return validate(canonical_provider(provider))

    return validate_provider_availability


def _optimum_modules() -> list[types.ModuleType]:
    return [
        m
        for name, m in list(sys.modules.items())
        if isinstance(m, types.ModuleType) and _under(name, _REBOUND)
    ]


def _under(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _swap(module: types.ModuleType, pairs: dict[int, tuple[Any, Any]]) -> None:
    """Rebind every name in ``module`` bound to an ``old`` of ``pairs`` to its ``new``."""
    for key, value in list(vars(module).items()):
        pair = pairs.get(id(value))
        if pair is not None and pair[0] is value:
            setattr(module, key, pair[1])


def _rebind_optimum(module: types.ModuleType) -> None:
    state = _state
    if state is None or not _under(module.__name__, _REBOUND):
        return
    if module.__name__ == _OPTIMUM_UTILS:
        validate = getattr(module, "validate_provider_availability", None)
        ours = {id(new) for _, new in state.replacements.values()}
        if callable(validate) and id(validate) not in ours:
            state.replacements.setdefault(id(validate), (validate, _accepting_alias(validate)))
    _swap(module, state.replacements)


def _rebind_loaded_optimum() -> None:
    utils = sys.modules.get(_OPTIMUM_UTILS)
    if isinstance(utils, types.ModuleType):
        _rebind_optimum(utils)  # first: it defines the function the others import
    for module in _optimum_modules():
        _rebind_optimum(module)


class _OptimumImportHook(importlib.abc.MetaPathFinder):
    """Rebinds onnxruntime's names in each optimum module as soon as that module is loaded."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if not _under(fullname, _REBOUND):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        exec_module = getattr(spec.loader, "exec_module", None)
        if exec_module is None or getattr(exec_module, "_rkort_rebinds", False):
            return spec

        def exec_then_rebind(module: types.ModuleType) -> None:
            exec_module(module)
            with _lock:
                _rebind_optimum(module)

        exec_then_rebind._rkort_rebinds = True  # type: ignore[attr-defined]
        # Each source or extension module has a loader of its own, so this touches one module.
        spec.loader.exec_module = exec_then_rebind  # type: ignore[union-attr,method-assign]
        return spec
