from __future__ import annotations

import pytest

import rkort

RKNN = "RKNNExecutionProvider"

CONFIGS = {
    "cpu": None,
    "rknn": [RKNN, "CPUExecutionProvider"],
}


def rknn_available() -> bool:
    return RKNN in rkort.get_available_providers()


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Every test session compiles into its own cache, never the user's."""
    mp = pytest.MonkeyPatch()
    mp.setenv("RKORT_CACHE_DIR", str(tmp_path_factory.mktemp("rkort-cache")))
    yield
    mp.undo()
