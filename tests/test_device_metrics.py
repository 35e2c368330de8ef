"""Device metrics: the macmon line parser, the background sampler against a stand-in
``macmon`` executable (a real child process), and the CPU / missing-tool paths."""

import json
import logging
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

from runs import device_metrics
from runs.device_metrics import DeviceMonitor, MacmonSampler, parse_macmon_line


def macmon_line(freq: float, util: float, power: float, temp: float) -> str:
    """One line as ``macmon pipe`` (v0.4+) prints it."""
    return json.dumps(
        {
            "timestamp": "2025-02-24T20:38:15.427569+00:00",
            "temp": {"cpu_temp_avg": 43.73614, "gpu_temp_avg": temp},
            "memory": {"ram_total": 25769803776, "ram_usage": 20985479168, "swap_total": 0, "swap_usage": 0},
            "ecpu_usage": [1181, 0.082656614],
            "pcpu_usage": [1974, 0.015181795],
            "gpu_usage": [freq, util],
            "cpu_power": 0.20486385,
            "gpu_power": power,
            "ane_power": 0.0,
            "all_power": 0.22231553,
            "sys_power": 5.876533,
            "ram_power": 0.11635789,
            "gpu_ram_power": 0.0009615385,
        }
    )


LINES = [macmon_line(400, 0.10, 1.0, 40.0), macmon_line(800, 0.50, 3.0, 44.0), macmon_line(1200, 0.90, 5.0, 48.0)]


def test_parse_real_looking_line():
    parsed = parse_macmon_line(macmon_line(461, 0.021497859, 0.017451683, 36.95167) + "\n")
    assert parsed == pytest.approx(
        {"gpu/freq_mhz": 461.0, "gpu/util_pct": 2.1497859, "gpu/power_w": 0.017451683, "gpu/temp_c": 36.95167}
    )


def test_parse_skips_noise_and_partial_fields():
    assert parse_macmon_line("") is None
    assert parse_macmon_line("Warning: something\n") is None
    assert parse_macmon_line('{"gpu_usage": [461, 0.02') is None  # cut short by a kill
    assert parse_macmon_line('{"gpu_power": 2.5}') == {"gpu/power_w": 2.5}


class Clock:
    """Stands in for ``time`` in ``runs.device_metrics``: samples are stamped and
    windows measured on a clock the test moves, so no assertion depends on how fast
    this machine runs the stand-in ``macmon``."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(device_metrics, "time", fake)
    return fake


def write_fake_macmon(folder: Path, lines: list[str], then: str = "exit", gated: tuple[str, ...] = ()) -> Path:
    """A stand-in ``macmon`` that prints ``lines``; then, once the file ``go`` exists in
    ``folder``, prints ``gated``; then sleeps until terminated (``then="sleep"``) or exits."""
    script = folder / "macmon"
    script.write_text(
        f"#!{sys.executable}\n"
        "import time\nfrom pathlib import Path\n"
        f"for line in {lines!r}:\n"
        "    print(line, flush=True)\n"
        f"if {list(gated)!r}:\n"
        f"    while not Path({str(folder / 'go')!r}).exists():\n"
        "        time.sleep(0.01)\n"
        f"    for line in {list(gated)!r}:\n"
        "        print(line, flush=True)\n"
        f"if {then == 'sleep'!r}:\n"
        "    time.sleep(3600)\n"
    )
    script.chmod(0o755)
    return script


def wait_for(condition) -> None:
    """Polls until ``condition()``; a generous deadline only turns a hang into a failure."""
    deadline = time.monotonic() + 120
    while not condition():
        assert time.monotonic() < deadline, "the stand-in macmon never got there"
        time.sleep(0.01)


def test_sampler_averages_a_live_stream(tmp_path, monkeypatch, clock):
    write_fake_macmon(tmp_path, LINES, then="sleep")
    monkeypatch.setenv("PATH", f"{tmp_path}:{Path(sys.executable).parent}")
    sampler = MacmonSampler()  # the default command, found on PATH
    sampler.start()
    wait_for(lambda: len(sampler._samples) == 3)
    out = sampler.read()
    assert out == pytest.approx({"gpu/freq_mhz": 800.0, "gpu/util_pct": 50.0, "gpu/power_w": 3.0, "gpu/temp_c": 44.0})
    child = sampler._proc
    sampler.stop()  # a child still sleeping is terminated, not waited for
    assert child.returncode == -signal.SIGTERM
    assert sampler.read() == {}


def test_sampler_window_drops_old_samples(tmp_path, clock):
    """Three hot samples, then, 10 s later on the sampler's clock, three cool ones:
    a 5 s window counts only the cool ones."""
    hot, cool = macmon_line(1000, 1.0, 100.0, 90.0), macmon_line(300, 0.0, 1.0, 30.0)
    script = write_fake_macmon(tmp_path, [hot] * 3, then="sleep", gated=(cool,) * 3)
    sampler = MacmonSampler(command=[str(script)], window_s=5.0)
    sampler.start()
    wait_for(lambda: len(sampler._samples) == 3)
    assert sampler.read() == pytest.approx({"gpu/freq_mhz": 1000.0, "gpu/util_pct": 100.0, "gpu/power_w": 100.0,
                                            "gpu/temp_c": 90.0})
    clock.now += 10.0
    (tmp_path / "go").touch()
    wait_for(lambda: len(sampler._samples) == 6)
    out = sampler.read()
    sampler.stop()
    assert out == pytest.approx({"gpu/freq_mhz": 300.0, "gpu/util_pct": 0.0, "gpu/power_w": 1.0, "gpu/temp_c": 30.0})


def test_sampler_survives_an_early_exit(tmp_path, caplog, clock):
    script = write_fake_macmon(tmp_path, LINES[:2], then="exit")
    sampler = MacmonSampler(command=[str(script), "pipe", "-i", "500"])
    sampler.start()
    wait_for(lambda: sampler.ended)
    clock.now += 60.0  # long after its last line: what it printed is still reported, once
    with caplog.at_level(logging.WARNING):
        out = sampler.read()
        assert sampler.read() == {}  # then nothing
    assert out == pytest.approx({"gpu/freq_mhz": 600.0, "gpu/util_pct": 30.0, "gpu/power_w": 2.0, "gpu/temp_c": 42.0})
    assert sum("macmon exited" in r.message for r in caplog.records) == 1
    sampler.stop()


def test_missing_macmon_warns_once(caplog):
    sampler = MacmonSampler(command=["macmon-that-is-not-installed", "pipe"])
    with caplog.at_level(logging.WARNING):
        sampler.start()
        assert sampler.read() == {}
        assert sampler.read() == {}
        sampler.stop()
    assert sum("not found on PATH" in r.message for r in caplog.records) == 1


def test_cpu_monitor_reports_process_metrics():
    """RSS is this process's; after busy work between start and read the CPU share is
    above zero (psutil counts CPU time in ticks: the work runs until the process has
    spent 0.2 s of CPU time, whatever the machine's speed)."""
    monitor = DeviceMonitor("cpu")
    monitor.start()
    spent = time.process_time() + 0.2
    while time.process_time() < spent:
        sum(i * i for i in range(10_000))
    out = monitor.read()
    rss = psutil.Process().memory_info().rss / 2**20
    monitor.stop()
    assert set(out) == {"proc/rss_mb", "proc/cpu_pct"}
    assert out["proc/rss_mb"] == pytest.approx(rss, rel=0.2)
    assert out["proc/cpu_pct"] > 0.0
