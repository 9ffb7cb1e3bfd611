"""Installs rkort into a Python program started by ``rkort run`` (this directory is on PYTHONPATH).

rkort is imported only when the program imports onnxruntime, so Python processes that never use
onnxruntime (pip, build tools, the program's other helpers) start as fast as before. A
``sitecustomize`` that this one shadows (the interpreter's or the environment's) still runs.
Standard library only: importing rkort here would import onnxruntime at every start.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import types

_HERE = os.path.dirname(os.path.abspath(__file__))


def _install_rkort() -> None:
    try:
        # The submodule, not the package: the program's own `import rkort` may be what imports
        # onnxruntime, and then the package is still being initialized.
        from rkort.integrations.install import install

        install()
        if os.environ.get("RKORT_REHEARSAL_REPORT"):
            import atexit

            from rkort.stats import write_process_report

            atexit.register(write_process_report)
    except Exception as e:  # noqa: BLE001 - the program runs on, as it would without rkort
        print(
            f"rkort run: could not install rkort in {sys.executable} ({type(e).__name__}: {e}); "
            "the program runs with plain onnxruntime",
            file=sys.stderr,
        )


class _WhenOnnxruntimeLoads:
    """Calls rkort.install() right after the module ``onnxruntime`` has been executed. It stays
    on sys.meta_path until then: transformers and optimum ask ``importlib.util.find_spec`` whether
    onnxruntime is installed long before they import it."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "onnxruntime":
            return None
        spec = None
        for finder in [f for f in sys.meta_path if f is not self]:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_install(module: types.ModuleType) -> None:
            exec_module(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            _install_rkort()

        spec.loader.exec_module = exec_then_install  # type: ignore[method-assign]
        return spec


def _run_shadowed_sitecustomize() -> None:
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)


if os.environ.get("RKORT_REHEARSAL"):
    # A rehearsed board has no converter: rknn-toolkit2 cannot be imported in this process tree
    # (the stand-in's own simulator worker runs without this variable).
    sys.modules["rknn"] = None  # type: ignore[assignment]
    sys.modules["rknn.api"] = None  # type: ignore[assignment]
if "onnxruntime" in sys.modules:
    _install_rkort()
else:
    sys.meta_path.insert(0, _WhenOnnxruntimeLoads())
_run_shadowed_sitecustomize()
