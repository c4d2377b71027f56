"""Suite-wide fixtures. Service fixtures live in tests/plugins/, one module per part of the stack."""
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLES_DIR = REPO / "samples"

pytest_plugins = [
    "tests.plugins.services",
    "tests.plugins.model",
    "tests.plugins.api",
    "tests.plugins.stack",
    "tests.plugins.dicom",
]


@pytest.fixture(scope="session")
def sample_paths() -> list[Path]:
    """The real fundus photographs shipped in samples/ (all gradable; see samples/README.md)."""
    paths = sorted(SAMPLES_DIR.glob("*.jpg"))
    assert paths, f"no sample photographs in {SAMPLES_DIR}"
    return paths
