"""The host simulator: rknn-toolkit2 builds the model and runs it in a worker process.

The simulator can only run a graph built in the same process, so the worker builds ``spec`` (and
exports the blob when asked, so one build serves the cache too), starts the simulator and then
answers inference requests over a socket. The toolkit's console output goes to the
``rkort.toolkit`` logger, and a crash of the toolkit ends the worker, not the user's process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..files import place_file
from ..options import RKNNOptions
from ..platform import toolkit_version
from ..spec import BuildSpec
from ..toolkit.process import WorkerDied, WorkerProcess
from ..toolkit.protocol import build_request
from .base import Opening, Runner, RunnerDied, RunnerError


class WorkerRunner(Runner):
    """A Runner whose model lives in a toolkit worker process (simulator, or a board over adb)."""

    def __init__(self, worker: WorkerProcess, spec: BuildSpec, name: str) -> None:
        super().__init__(spec)
        self.name = name
        self._worker = worker
        self._died: str | None = None
        #: What the worker reported when it became ready (build_seconds, toolkit_version, ...).
        self.build_info: dict[str, Any] = {}

    @property
    def pid(self) -> int:
        """The worker process's id."""
        return self._worker.pid

    def _run(self, inputs: list[np.ndarray]) -> list[Any]:
        if self._died is not None:
            raise RunnerDied(self._died)
        try:
            return self._worker.call(inputs)
        except WorkerDied as e:
            self._died = (
                f"the {self.name} worker process (pid {self.pid}) running "
                f"{self.spec.model_name} died (it {e}); this runner cannot be used any more, "
                "open a new session"
            )
            raise RunnerDied(self._died) from None
        except RuntimeError as e:
            raise RunnerError(f"{self.name} could not run {self.spec.model_name}: {e}") from None

    def _release(self) -> None:
        self._worker.close()


def open_simulator(
    spec: BuildSpec, export_to: Path | None = None, *, progress: bool | None = None
) -> WorkerRunner:
    """Build ``spec`` in a simulator worker and return a Runner serving it.

    With ``export_to`` the blob is also written there (atomically, after the export succeeded).
    Build failures raise :class:`rkort.compiler.CompileError` subclasses.
    """
    worker = WorkerProcess(
        "serve",
        build_request(spec, export=export_to is not None, runtime={"target": None}),
        subject=f"{spec.model_name} on the {spec.target} simulator",
        progress=progress,
    )
    try:
        info = worker.wait_until("ready")
        if export_to is not None:
            place_file(worker.workdir / info["blob"], Path(export_to))
    except BaseException:
        worker.close()
        raise
    runner = WorkerRunner(worker, spec, "simulator")
    runner.build_info = info
    return runner


class _Simulator:
    name = "simulator"
    builds = True

    def available(self, options: RKNNOptions | None = None) -> bool:
        return toolkit_version() is not None

    def open(self, o: Opening) -> Runner:
        return open_simulator(o.spec, o.export_to, progress=o.progress)


BACKEND = _Simulator()
