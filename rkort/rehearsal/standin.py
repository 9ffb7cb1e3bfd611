"""A stand-in for rknn-toolkit-lite2's ``RKNNLite``, for rehearsing a board on a host.

``rkort run --board SOC`` puts a package named ``rknnlite`` on PYTHONPATH whose
``rknnlite.api.RKNNLite`` is this class, the rehearsal's one substitute: rkort's board code path
runs unchanged above it. Its constants, methods and argument forms are rknn-toolkit-lite2
2.5.0's (read from that release's wheel: ``load_rknn(path, key_path=None)``,
``init_runtime(target=None, device_id=None, async_mode=False, core_mask=NPU_CORE_AUTO)``,
``inference(inputs, data_type=None, data_format=None, inputs_pass_through=None,
get_frame_id=False, reuse_outputs=False)``, ``get_sdk_version()``,
``list_support_target_platform(rknn_model=None)``, ``list_devices()``, ``release()``), and so are
its failure forms: 0/-1 returns and ``None`` from ``inference()``, with the reason logged.

Like the board's runtime it refuses a blob for another SoC, a blob newer than the (rehearsed)
librknnrt, a core mask the SoC does not have, and inputs of the wrong size. It executes a blob
with the host simulator: the blob's cache entry records the ONNX file and BuildSpec it was built
from (its recipe, :func:`rkort.spec.build_recipe`), which a toolkit worker builds again and serves. The file is
checked against the sha256 recorded at build time (regenerated from the model when it is gone),
so what runs is what the blob was built from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ..blobinfo import BlobFormatError, BlobInfo, read_blob_info, runtime_can_load
from ..files import sha256_file
from ..graph import lower_opset, prepare
from ..model import ModelSource
from ..platform import board_soc, cores_of, librknnrt_version
from ..segment_files import SegmentFiles
from ..segments import Segment
from ..spec import BuildSpec
from ..stats import REPORT_ENV
from ..toolkit.process import WorkerProcess
from ..toolkit.protocol import build_request
from . import PYTHON_ENV, REHEARSAL_ENV

log = logging.getLogger("rknnlite")


class RKNNLite:
    """rknn-toolkit-lite2's ``RKNNLite``, executing blobs with the host simulator."""

    NPU_CORE_AUTO = 0
    NPU_CORE_0 = 1
    NPU_CORE_1 = 2
    NPU_CORE_2 = 4
    NPU_CORE_0_1 = 3
    NPU_CORE_0_1_2 = 7
    NPU_CORE_ALL = 0xFFFF

    def __init__(self, verbose: bool = False, verbose_file: str | None = None) -> None:
        self.verbose = verbose
        self.rknn_data: bytes | None = None
        self._path: Path | None = None
        self._info: BlobInfo | None = None
        self._worker: Any = None
        self._spec: BuildSpec | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        # A context used by two threads at once corrupts results on boards (rknn-toolkit2 issues
        # 461, 533): the stand-in refuses the second call, loudly.
        self._busy = threading.Lock()

    # -- the runtime's API --

    def load_rknn(self, path: str, key_path: str | None = None) -> int:
        if not os.path.exists(path):
            log.error("Invalid RKNN model path: %s", path or "None")
            return -1
        try:
            with open(path, "rb") as f:
                self.rknn_data = f.read()
        except OSError as e:
            log.error("Catch exception when loading RKNN model [%s]! %s", path, e)
            return -1
        if key_path is not None:
            log.error("encrypted models cannot be rehearsed (key_path=%s)", key_path)
            return -1
        self._path = Path(path)
        return 0

    def init_runtime(
        self,
        target: str | None = None,
        device_id: str | None = None,
        async_mode: bool = False,
        core_mask: int = NPU_CORE_AUTO,
    ) -> int:
        if self.rknn_data is None or self._path is None:
            log.error("Model is not loaded yet, this interface should be called after load_rknn!")
            return -1
        self.release()
        try:
            info = read_blob_info(self.rknn_data)
        except BlobFormatError as e:
            log.error("Invalid RKNN model: %s", e)
            return -1
        soc = board_soc()
        if soc is None:
            log.error("no board is rehearsed here (RKORT_BOARD is not set)")
            return -1
        if info.targets and soc not in info.targets:
            log.error(
                "The RKNN model's target platform %s does not match this NPU (%s)",
                list(info.targets),
                soc,
            )
            return -1
        runtime = librknnrt_version()
        if runtime_can_load(info.version, runtime) is False:
            log.error(
                "Invalid RKNN model version %d: built by rknn-toolkit2 %s, newer than this "
                "librknnrt %s",
                info.format,
                info.version,
                runtime,
            )
            return -1
        if not _core_mask_ok(core_mask, cores_of(soc)):
            log.error(
                "set core mask %d failed: %s has %d NPU core(s)", core_mask, soc, cores_of(soc)
            )
            return -1
        try:
            self._spec, self._worker = self._start(self._path, self.rknn_data)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            log.error("Catch exception when init runtime! %s", e)
            self.release()
            return -1
        self._info = info
        return 0

    def inference(
        self,
        inputs: list[np.ndarray],
        data_type: str | None = None,
        data_format: Any = None,
        inputs_pass_through: Any = None,
        get_frame_id: bool = False,
        reuse_outputs: bool = False,
    ) -> list[np.ndarray] | None:
        if self._worker is None or self._spec is None or self._info is None:
            log.error(
                "Runtime environment is not inited, please call init_runtime to init it first!"
            )
            return None
        expected = [shape for _, shape in self._info.inputs]
        if len(inputs) != len(expected):
            log.error(
                "Catch exception when setting inputs: %d inputs, the model has %d",
                len(inputs),
                len(expected),
            )
            return None
        arrays = []
        for i, (a, shape) in enumerate(zip(inputs, expected)):
            a = np.asarray(a)
            if shape and a.size != int(np.prod(shape)):
                log.error(
                    "Catch exception when setting inputs: input %d has %d elements, the model takes %s",
                    i,
                    a.size,
                    list(shape),
                )
                return None
            arrays.append(a)
        if not self._busy.acquire(blocking=False):
            log.error("RKNNLite.inference() called by two threads at once on one context")
            return None
        try:
            outputs = self._worker.call(arrays, data_format)
        except Exception as e:  # noqa: BLE001 - the runtime's form: logged, and None
            log.error("Catch exception when running RKNN model. %s", e)
            return None
        finally:
            self._busy.release()
        return [np.asarray(o, dtype=np.float32) for o in outputs]

    def get_sdk_version(self) -> str | None:
        if self._worker is None:
            log.error(
                "Runtime environment is not inited, please call init_runtime to init it first!"
            )
            return None
        runtime = librknnrt_version() or "unknown"
        return f"librknnrt version: {runtime} (rkort board rehearsal on the host simulator)"

    def list_support_target_platform(self, rknn_model: str | None = None) -> dict[str, Any] | None:
        if rknn_model is None:
            return {"support_target_platform": [board_soc() or "rk3588"]}
        try:
            return {"support_target_platform": list(read_blob_info(rknn_model).targets)}
        except (OSError, BlobFormatError):
            log.error("The model %s does not exist.", rknn_model)
            return None

    def list_devices(self) -> tuple[list[str], list[str]]:
        return [], []

    def release(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.close()
        tmp, self._tmp = self._tmp, None
        if tmp is not None:
            tmp.cleanup()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # -- what the stand-in does instead of an NPU --

    def _start(self, path: Path, data: bytes) -> tuple[BuildSpec, Any]:
        """A simulator worker serving what the blob at ``path`` was built from."""
        meta = json.loads((path.parent / "meta.json").read_text())
        if meta.get("sha256") != hashlib.sha256(data).hexdigest():
            raise ValueError(f"{path} is not the blob its meta.json describes")
        source = meta.get("source")
        if not isinstance(source, dict):
            raise ValueError(
                f"{path} has no recipe (it was not built by rkort on a host): it cannot be rehearsed"
            )
        onnx_file = self._source_file(source)
        config = ("target", "float_dtype", "quantized_dtype", "dataset", "optimization_level")
        spec = BuildSpec.from_json(
            source["spec"], onnx_file, **{k: source["spec"][k] for k in config}
        )
        env = {k: v for k, v in os.environ.items() if k not in (REHEARSAL_ENV, REPORT_ENV)}
        worker = WorkerProcess(
            "serve",
            build_request(spec, export=False, runtime={"target": None}),
            subject=f"{spec.model_name} (rehearsed {board_soc()} NPU)",
            progress=False,
            python=os.environ.get(PYTHON_ENV) or None,
            env=env,
        )
        try:
            worker.wait_until("ready")
        except BaseException:
            worker.close()
            raise
        return spec, worker

    def _source_file(self, source: dict[str, Any]) -> str:
        """The ONNX file the blob was built from: the recorded one if it is unchanged, else the
        same file made again from the model (a segment, or the model lowered to opset 19) by the
        rehearsal's Python, whose onnx is the one that cut it."""
        path, digest = str(source["file"]), str(source["file_sha256"])
        if os.path.isfile(path) and sha256_file(path)[0] == digest:
            return path
        if source.get("kind") not in ("segment", "lowered") or not source.get("model"):
            raise ValueError(f"the file this blob was built from ({path}) is gone or changed")
        self._tmp = tempfile.TemporaryDirectory(prefix="rkort-rehearsal-")
        request = Path(self._tmp.name) / "source.json"
        request.write_text(json.dumps(source))
        done = subprocess.run(
            [os.environ.get(PYTHON_ENV) or sys.executable, "-m", __name__, str(request)],
            capture_output=True,
            text=True,
            env={k: v for k, v in os.environ.items() if k != REHEARSAL_ENV},
            timeout=600,
        )
        made = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
        if done.returncode != 0 or not made:
            raise ValueError(
                f"could not make the blob's source again: {done.stderr.strip()[-500:]}"
            )
        if sha256_file(made)[0] != digest:
            raise ValueError(
                f"the file made again from {source['model']} differs from the one the blob was "
                "built from (another onnx or rkort version?): it cannot be rehearsed"
            )
        return made


def regenerate(source: dict[str, Any], directory: Path) -> Path:
    """Write the segment (or lowered model) a recipe names, as the planner wrote it."""
    model = ModelSource(source["model"])
    lowered, _ = lower_opset(model.proto)
    signature = {str(n): tuple(s) for n, s in source["signature"]}
    if source["kind"] == "lowered":
        return SegmentFiles(
            lowered, lowered, {}, signature, model.path.parent, directory
        ).write_lowered()
    prepared, types = prepare(lowered, signature)
    files = SegmentFiles(lowered, prepared, types, signature, model.path.parent, directory)
    seg = source["segment"]
    return files.write(
        Segment(-1, "npu", tuple(seg["nodes"]), tuple(seg["inputs"]), tuple(seg["outputs"]))
    )


def _core_mask_ok(mask: int, cores: int) -> bool:
    if mask in (0, 0xFFFF):
        return True
    if mask < 0 or mask >= (1 << cores):
        return False
    # RK3588 refuses the non-contiguous masks 5 and 6 (reported: suharvest/rkvoice-stream PR 5).
    return not (cores == 3 and mask in (5, 6))


if __name__ == "__main__":
    # python -m rkort.rehearsal.standin SOURCE.json: make a blob's source file again, print its path
    _request = Path(sys.argv[1])
    print(regenerate(json.loads(_request.read_text()), _request.parent / "source"))
