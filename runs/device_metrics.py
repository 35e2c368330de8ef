"""Device and process metrics that trackio does not collect, read once per epoch.

trackio's own collectors (``trackio.init(auto_log_gpu=..., auto_log_cpu=...)``, on when
``trackio.system_metrics=true``) fill its "System Metrics" page: NVIDIA GPUs through
NVML (utilisation, memory, power, temperature, clocks), Apple GPUs through ioreg, and
the machine's CPU, RAM, disk and network. What they lack is here, each in one place.
``DeviceMonitor(device)`` returns flat ``{name: float}`` dicts ready for ``trackio.log``:

- everywhere: ``proc/rss_mb`` (resident memory of this process) and
  ``proc/cpu_pct`` (CPU use of this process since the previous read; can pass 100
  with several busy cores), from psutil;
- CUDA: torch's allocator, ``cuda/allocated_mb`` (tensors alive now) and
  ``cuda/peak_mb`` (the peak since the previous read: the peak counter is reset at
  each read, so every epoch gets its own);
- Apple MPS: ``mps/allocated_mb`` (tensors alive now), ``mps/driver_mb`` (all the
  Metal driver holds, caches included), and from ``macmon pipe`` the 5-second
  rolling means ``gpu/util_pct``, ``gpu/freq_mhz``, ``gpu/power_w``, ``gpu/temp_c``.

macOS offers no sudo-less GPU counters to Python, so ``macmon`` (a small Rust tool,
``brew install macmon``) runs as a child process printing one JSON object per
sample; a background thread parses them. A missing ``macmon`` gives one warning
and the run goes on without those keys; a ``macmon`` that dies
mid-run has what it printed reported once, then a warning.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import threading
import time
from collections import deque

import psutil
import torch

log = logging.getLogger(__name__)

MIB = 2**20
DEFAULT_MACMON_COMMAND = ("macmon", "pipe", "-i", "500")  # one sample every 500 ms


def parse_macmon_line(line: str) -> dict[str, float] | None:
    """Read the GPU fields out of one ``macmon pipe`` line; None for a non-JSON line.

    macmon (v0.4+) prints, per sample, e.g.
    ``{"timestamp": "...", "temp": {"cpu_temp_avg": 43.7, "gpu_temp_avg": 36.9},
    "gpu_usage": [461, 0.0215], "gpu_power": 0.0175, "cpu_power": 0.2, ...}``
    where ``gpu_usage`` is ``[frequency in MHz, active residency as a fraction]``
    and powers are in watts. Fields missing from a line (older or newer macmon)
    are left out of the result rather than guessed.
    """
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        sample = json.loads(line)
    except json.JSONDecodeError:  # a line cut short when macmon is killed mid-write
        return None
    out: dict[str, float] = {}
    gpu_usage = sample.get("gpu_usage")
    if gpu_usage is not None:
        out["gpu/freq_mhz"] = float(gpu_usage[0])
        out["gpu/util_pct"] = 100.0 * float(gpu_usage[1])
    if sample.get("gpu_power") is not None:
        out["gpu/power_w"] = float(sample["gpu_power"])
    gpu_temp = sample.get("temp", {}).get("gpu_temp_avg")
    if gpu_temp is not None:
        out["gpu/temp_c"] = float(gpu_temp)
    return out


class MacmonSampler:
    """Runs ``macmon pipe`` in the background and averages its recent samples.

    Args:
        command: the command to run; its first word is looked up on PATH. Any
            program printing macmon's JSON lines works (the tests use a stand-in).
        window_s: ``read`` averages the samples of the last ``window_s`` seconds.
    """

    def __init__(self, command: tuple[str, ...] | list[str] = DEFAULT_MACMON_COMMAND, window_s: float = 5.0):
        self.command = list(command)
        self.window_s = window_s
        self._samples: deque[tuple[float, dict[str, float]]] = deque()
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None
        self._ended = threading.Event()  # set when macmon's output closes
        self._stopping = False
        self._exit_reported = False
        self.available = False

    def start(self) -> None:
        executable = shutil.which(self.command[0])
        if executable is None:
            log.warning(
                "%s not found on PATH: Apple GPU metrics (gpu/*) are off for this run (brew install macmon)",
                self.command[0],
            )
            return
        self._proc = subprocess.Popen(
            [executable, *self.command[1:]],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        self._thread = threading.Thread(target=self._reader, name="macmon-reader", daemon=True)
        self._thread.start()
        self.available = True

    def _reader(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            parsed = parse_macmon_line(line)
            if parsed:
                with self._lock:
                    self._samples.append((time.monotonic(), parsed))
        self._ended.set()

    @property
    def ended(self) -> bool:
        """True once macmon's output has closed (it exited, or ``stop`` ended it)."""
        return self._ended.is_set()

    def read(self) -> dict[str, float]:
        """Mean of each field over the last ``window_s`` seconds of samples.

        After macmon has exited on its own, the last window it printed is reported
        once, with a warning; later reads return nothing.
        """
        if not self.available:
            return {}
        ended = self._ended.is_set()
        with self._lock:
            if ended and self._exit_reported:
                return {}
            # A live macmon is averaged up to now; a dead one up to its last line,
            # so a crash between two reads still reports what it printed.
            newest = time.monotonic() if not ended or not self._samples else self._samples[-1][0]
            while self._samples and self._samples[0][0] < newest - self.window_s:
                self._samples.popleft()
            window = [sample for _, sample in self._samples]
        if ended and not self._stopping:
            self._exit_reported = True
            code = self._proc.poll()
            log.warning("macmon exited (code %s): Apple GPU metrics (gpu/*) stop here", code)
        return _mean_by_key(window)

    def stop(self) -> None:
        if self._proc is None:
            return
        self._stopping = True
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:  # macmon ignores SIGTERM only if wedged
                self._proc.kill()
                self._proc.wait()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        self.available = False


def _mean_by_key(samples: list[dict[str, float]]) -> dict[str, float]:
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for sample in samples:
        for key, value in sample.items():
            sums[key] = sums.get(key, 0.0) + value
            counts[key] = counts.get(key, 0) + 1
    return {key: sums[key] / counts[key] for key in sums}


class DeviceMonitor:
    """What the training loop calls: ``start()`` once, ``read()`` per epoch, ``stop()``.

    Args:
        device: the training device; its type decides which readers run.
        macmon_command: the command that streams Apple GPU samples (MPS only).
        window_s: averaging window of the Apple GPU samples, seconds.
    """

    def __init__(
        self,
        device: torch.device | str,
        macmon_command: tuple[str, ...] | list[str] = DEFAULT_MACMON_COMMAND,
        window_s: float = 5.0,
    ):
        self.device = torch.device(device)
        self._process = psutil.Process()
        self._macmon = MacmonSampler(macmon_command, window_s) if self.device.type == "mps" else None

    def start(self) -> None:
        self._process.cpu_percent(None)  # the first call only sets the reference point
        if self._macmon is not None:
            self._macmon.start()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def read(self) -> dict[str, float]:
        metrics = {
            "proc/rss_mb": self._process.memory_info().rss / MIB,
            "proc/cpu_pct": self._process.cpu_percent(None),
        }
        if self.device.type == "cuda":
            metrics["cuda/allocated_mb"] = torch.cuda.memory_allocated(self.device) / MIB
            metrics["cuda/peak_mb"] = torch.cuda.max_memory_allocated(self.device) / MIB
            torch.cuda.reset_peak_memory_stats(self.device)  # next read gets the next epoch's peak
        if self.device.type == "mps":
            metrics["mps/allocated_mb"] = torch.mps.current_allocated_memory() / MIB
            metrics["mps/driver_mb"] = torch.mps.driver_allocated_memory() / MIB
        if self._macmon is not None:
            metrics.update(self._macmon.read())
        return metrics

    def stop(self) -> None:
        if self._macmon is not None:
            self._macmon.stop()
