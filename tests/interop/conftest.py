"""The real Keycloak for the interop tests: one per session, its log attached to the report
of every test that used it and failed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from testing.keycloak import Keycloak, keycloak_server, missing_tools
from testing.services import Unavailable

LOG_TAIL = 8000


@pytest.fixture(scope="session")
def keycloak(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keycloak]:
    missing = missing_tools()
    if missing:
        # Skipped where Java or Maven is absent; a failure under CI=true (tests/conftest.py).
        raise Unavailable(f"the Keycloak tests need {' and '.join(missing)} on PATH")
    with keycloak_server(tmp_path_factory.mktemp("keycloak")) as server:
        yield server


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    server = getattr(item, "funcargs", {}).get("keycloak")
    if report.failed and isinstance(server, Keycloak):
        report.sections.append(("Keycloak's log (its end)", server.log_text()[-LOG_TAIL:]))
