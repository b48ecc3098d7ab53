"""A fixture that runs every test of a module once per transport (``fetchpool.config.TRANSPORTS``).

Import it into a module (``from support.transports import every_transport``): it overrides the
module's ``transport`` fixture, which starts services with ``--transport``.
"""

from __future__ import annotations

import pytest
from fetchpool.config import TRANSPORTS


@pytest.fixture(scope="module", params=TRANSPORTS, name="transport")
def every_transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)
