from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import CloudPKI


@pytest.fixture
def pki(tmp_path: Path) -> CloudPKI:
    return CloudPKI(tmp_path / "pki")
