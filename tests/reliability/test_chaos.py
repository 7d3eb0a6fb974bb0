"""`make chaos` in short: every fault scenario with a few seconds of load, real processes
stopped and started, and every check of the full run (see reliability/chaos.py)."""

from __future__ import annotations

import re
import shutil

import pytest

from reliability.chaos import main

pytestmark = pytest.mark.slow

SHORT = ["--duration", "3", "--outage", "1.5", "--concurrency", "8"]


def _run(scenarios: str, capsys: pytest.CaptureFixture[str]) -> str:
    status = main(["--scenarios", scenarios, *SHORT])
    output = capsys.readouterr().out
    assert status == 0, output
    return output


def _figures(output: str, scenario: str) -> dict[str, str]:
    block = output.split(f"== {scenario}: ", 1)[1].split("\n==", 1)[0]
    return dict(re.findall(r"^  (\S.*?)\s{2,}(\S.*)$", block, re.M))


def test_database_redis_and_sigterm_faults_under_load(capsys):
    scenarios = ("postgres", "postgres-frozen", "redis", "redis-fail-closed", "sigterm")
    output = _run(",".join(scenarios), capsys)
    for scenario in scenarios:
        figures = _figures(output, scenario)
        assert figures["lost writes (201, not in the database)"] == "0", output
        assert int(figures["writes answered 201"]) > 0, output
        assert not [name for name in figures if name.startswith("FAIL")], output
    assert int(_figures(output, "postgres")["5xx"]) > 0  # the outage was seen
    assert _figures(output, "redis")["5xx"] == "0"


@pytest.mark.skipif(shutil.which("nginx") is None, reason="needs nginx (apt-get install nginx)")
def test_rolling_restart_behind_nginx_drops_nothing(capsys):
    figures = _figures(_run("rolling", capsys), "rolling")
    assert figures["2xx"] == figures["requests sent"]
    assert figures["lost writes (201, not in the database)"] == "0"


def test_broker_worker_and_mail_faults_under_load_mail_each_task_once(capsys):
    # A light load: solo workers deliver a few dozen mails a second, all checked afterwards.
    status = main(["--scenarios", "mail", "--duration", "3", "--outage", "1.5",
                   "--concurrency", "2", "--think", "0.1"])  # fmt: skip
    output = capsys.readouterr().out
    assert status == 0, output
    figures = _figures(output, "mail")
    assert figures["lost writes (201, not in the database)"] == "0"
    assert int(figures["writes answered 201"]) > 0
