"""Rehearsing a Rockchip board on a host: ``rkort run --board SOC -- app`` runs rkort's real board
code path, with blobs from the cache only, the converter out of reach, and one stand-in:
rknn-toolkit-lite2's ``RKNNLite`` (:mod:`.standin`), executing blobs on the host simulator. At
exit, :mod:`.report` tells what ran on the NPU, what on the CPU and why, and what the cache lacks.
"""

from pathlib import Path

#: The directory ``rkort run --board`` puts on PYTHONPATH: it holds the ``rknnlite`` stand-in.
SITE_DIR = Path(__file__).resolve().with_name("site")
#: Set in a rehearsed process tree: the converter is kept out of reach there.
REHEARSAL_ENV = "RKORT_REHEARSAL"
#: The interpreter whose rknn-toolkit2 runs the simulator (the rehearsed app's own may have none).
PYTHON_ENV = "RKORT_REHEARSAL_PYTHON"
