"""The board's NPU through rknn-toolkit-lite2 (aarch64 Rockchip boards with librknnrt.so)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..blobinfo import BlobFormatError, read_blob_info, runtime_can_load
from ..options import RKNNOptions
from ..platform import board_runtime_importable, board_soc, is_board, librknnrt_version
from ..spec import BuildSpec, data_formats
from .base import Opening, Runner, RunnerError


class BoardRunner(Runner):
    name = "board"

    def __init__(self, lite: Any, spec: BuildSpec, core_mask: int) -> None:
        super().__init__(spec)
        self.core_mask = core_mask
        self._lite = lite
        self._formats = data_formats(spec.input_shapes)

    def _run(self, inputs: list[np.ndarray]) -> list[Any]:
        outputs = self._lite.inference(inputs=inputs, data_format=self._formats)
        if outputs is None:
            raise RunnerError(
                f"RKNNLite.inference() failed for {self.spec.model_name} (it returned None; "
                "the runtime's reason is in its console output)"
            )
        return list(outputs)

    def _release(self) -> None:
        lite, self._lite = self._lite, None
        if lite is not None:
            lite.release()


def open_board(blob_path: Path, spec: BuildSpec, core_mask: int = 0) -> Runner:
    """Load ``blob_path`` into the board's NPU runtime on the cores in ``core_mask`` (0: auto).

    A blob this board's runtime cannot load (built for another SoC, or by a toolkit newer than
    its librknnrt) is refused with a message naming both, before the runtime is asked.
    """
    try:
        from rknnlite.api import RKNNLite
    except ImportError as e:
        raise RunnerError(
            f"rknn-toolkit-lite2 cannot be imported ({e}); install rkort[board] on the board"
        ) from e
    built, runtime = _check_loadable(blob_path, spec)
    lite = RKNNLite(verbose=False)
    ret = lite.load_rknn(str(blob_path))
    if ret != 0:
        lite.release()
        raise RunnerError(f"RKNNLite.load_rknn({str(blob_path)!r}) returned {ret}")
    ret = lite.init_runtime(core_mask=core_mask)
    if ret != 0:
        lite.release()
        raise RunnerError(
            f"RKNNLite.init_runtime(core_mask={core_mask}) returned {ret} for {spec.model_name} "
            f"(blob built by rknn-toolkit2 {built or 'of unknown version'}, this board's librknnrt "
            f"{runtime or 'of unknown version'}; the runtime's reason is in its console output)"
        )
    return BoardRunner(lite, spec, core_mask)


def _check_loadable(blob_path: Path, spec: BuildSpec) -> tuple[str | None, str | None]:
    """(the toolkit version that built the blob, this board's librknnrt version); raises
    RunnerError for a blob the runtime would refuse."""
    try:
        info = read_blob_info(blob_path)
    except (OSError, BlobFormatError) as e:
        raise RunnerError(f"{blob_path} is not a loadable RKNN blob: {e}") from e
    runtime = librknnrt_version()
    if runtime_can_load(info.version, runtime) is False:
        raise RunnerError(
            f"this board's librknnrt is {runtime}, older than rknn-toolkit2 {info.version} that "
            f"built the blob of {spec.model_name}: a runtime refuses blobs of a newer toolkit "
            f"('Invalid RKNN model version'). Update librknnrt to {info.version} or newer, or "
            f"build the blobs with rknn-toolkit2 {runtime}"
        )
    soc = board_soc()
    if soc is not None and info.targets and soc not in info.targets:
        raise RunnerError(
            f"the blob of {spec.model_name} was built for {', '.join(info.targets)}, and this "
            f"board is an {soc}: warm the cache with --target {soc}"
        )
    return info.version or None, runtime


class _Board:
    name = "board"
    builds = False

    def available(self, options: RKNNOptions | None = None) -> bool:
        return is_board() and board_runtime_importable()

    def open(self, o: Opening) -> Runner:
        if o.blob is None:
            raise ValueError("the board backend runs compiled blobs: give Opening.blob")
        mask = o.core_mask if o.core_mask is not None else (o.options.core_mask if o.options else 0)
        return open_board(o.blob, o.spec, mask)


BACKEND = _Board()
