"""`make soak`: its verdicts, and a short run of the whole thing (the full one is `make soak`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from reliability.soak import MIB, Sample, Segment, main, verdicts

pytestmark = pytest.mark.slow


def _segment(name: str, started: float, *, rps: float = 100, p99: float = 20) -> Segment:
    return Segment(name, started, started + 10, int(rps * 10), rps, 5, p99, p99 * 2, 0, {}, 0, 0)


def _run(**changes: object) -> dict[str, bool]:
    """The verdicts of a healthy run of a warm-up and three segments, with `changes`."""
    segments = [_segment("warm-up", 0), *(_segment(str(n), 10.0 * n) for n in (1, 2, 3))]
    samples = [Sample(float(t), {1: 100 * MIB, 2: 110 * MIB}, 12) for t in range(0, 41, 2)]
    options: dict[str, object] = {
        "rate": 100.0,
        "warmup_end": 10.0,
        "workers": 2,
        "db_limit": 40,
        "max_rss_growth": 0.10,
        "max_p99_ratio": 1.5,
        "log_problems": [],
    }
    for name, value in changes.items():
        if name == "segments":
            segments = value  # type: ignore[assignment]
        elif name == "samples":
            samples = value  # type: ignore[assignment]
        else:
            options[name] = value
    results = verdicts(segments, samples, **options)  # type: ignore[arg-type]
    return {v.check.split(" ")[0]: v.ok for v in results}


def test_a_healthy_run_passes_every_check() -> None:
    assert _run() == {
        "errors": True, "server": True, "rate": True, "2": True, "RSS": True, "DB": True,
        "p99": True,
    }  # fmt: skip


def test_each_check_fails_on_its_own_fault() -> None:
    failed = _segment("2", 20)
    failed.errors, failed.error_kinds = 3, {"status": 2, "timeout": 1}
    ok = [_segment("warm-up", 0), _segment("1", 10)]
    assert not _run(segments=[*ok, failed, _segment("3", 30)])["errors"]
    assert not _run(log_problems=["ERROR boom"])["server"]
    assert not _run(segments=[*ok, _segment("2", 20, rps=90)])["rate"]

    # Growth counts from the end of the warm-up (t = 10 s): 100 MiB then, 100 + mib at t = 40 s.
    def growing(mib: int) -> list[Sample]:
        return [Sample(float(t), {1: (100 + max(0, t - 10) * mib // 30) * MIB, 2: 110 * MIB}, 12)
                for t in range(0, 41, 2)]  # fmt: skip

    assert not _run(samples=growing(12))["RSS"]
    assert _run(samples=growing(9))["RSS"]
    restarted = [Sample(float(t), {1: 100 * MIB, 2 if t < 20 else 3: 110 * MIB}, 12)
                 for t in range(0, 41, 2)]  # fmt: skip
    assert not _run(samples=restarted)["2"]
    assert not _run(samples=restarted)["RSS"]
    crowded = [Sample(float(t), {1: 100 * MIB, 2: 110 * MIB}, 41 if t == 30 else 12)
               for t in range(0, 41, 2)]  # fmt: skip
    assert not _run(samples=crowded)["DB"]
    assert not _run(segments=[*ok, _segment("2", 20), _segment("3", 30, p99=31)])["p99"]
    assert _run(segments=[*ok, _segment("2", 20), _segment("3", 30, p99=30)])["p99"]
    assert not _run(segments=[_segment("warm-up", 0), _segment("1", 10)])["p99"]


@pytest.mark.skipif(shutil.which("wrk") is None, reason="needs wrk")
def test_a_short_soak_reports_every_figure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(
        ["--rows", "5000", "--rate", "100", "--warmup", "3", "--duration", "12",
         "--segment", "6", "--connections", "16", "--threads", "4", "--sample-interval", "0.5",
         "--results", str(tmp_path)]
    )  # fmt: skip
    out = capsys.readouterr().out
    (saved,) = tmp_path.glob("*-soak-5000rows-100rps.json")
    document = json.loads(saved.read_text())

    segments = document["segments"]
    assert [s["name"] for s in segments] == ["warm-up", "1", "2"]
    for segment in segments:
        assert segment["requests"] > 0
        assert 0 < segment["p50_ms"] <= segment["p99_ms"]
        assert len(segment["rss_mib"]) == 2
        assert segment["db_connections"] > 0
        assert segment["late"] >= 0
    assert len(document["samples"]) >= 20
    checks = {v["check"].split(" ")[0]: v for v in document["verdicts"]}
    assert set(checks) == {"errors", "server", "rate", "2", "RSS", "DB", "p99"}
    # What a short run on a busy machine must still get right; timing verdicts may vary.
    for name in ("errors", "server", "2", "DB"):
        assert checks[name]["ok"], checks[name]
    assert status == (0 if all(v["ok"] for v in checks.values()) else 1)
    for line in (
        "req/s",
        "p50 ms",
        "p99 ms",
        "late",
        "DB conns",
        "RSS growth per worker",
        "p99 last",
    ):
        assert line in out
