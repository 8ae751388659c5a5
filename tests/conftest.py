"""Session-wide: the harness's kept worker processes stop when the session ends."""

import pytest

from tests.harness import close_workers


@pytest.fixture(scope="session", autouse=True)
def _stop_harness_workers():
    yield
    close_workers()
