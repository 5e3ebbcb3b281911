"""How many threads torch computes with: the cores that other processes leave free.

Every OpenMP region of torch ends in a barrier. When another process holds a core, the thread
on it is descheduled for a whole scheduler quantum while its sibling waits, so with more
threads than free cores a step is several times slower, not a little slower (bench/NOTES.md,
"Threads on a busy machine"). `ThreadPolicy` measures the CPU time other processes take on the
cores this process may use, and runs torch on the rest, re-checking every few seconds.

`YUNQUE_THREADS=N` (or the OpenMP standard `OMP_NUM_THREADS=N`) fixes the count instead.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path


def _affinity() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return list(range(os.cpu_count() or 1))


def _read_proc() -> tuple[float, float] | None:
    """(busy ticks of the CPUs this process may run on, this process's own CPU ticks), or None off Linux."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
        own = Path("/proc/self/stat").read_text()
    except OSError:
        return None
    cpus = {f"cpu{i}" for i in _affinity()}
    busy = 0
    for ln in lines:
        name, _, rest = ln.partition(" ")
        if name in cpus:
            v = [int(x) for x in rest.split()]
            busy += sum(v[:8]) - v[3] - v[4]  # all but idle and iowait (guest time is inside user)
    fields = own.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return float(busy), float(int(fields[11]) + int(fields[12]))  # utime + stime, every thread


def fixed_threads(environ: dict[str, str] | None = None) -> int | None:
    """The count the user fixed with YUNQUE_THREADS or OMP_NUM_THREADS, else None."""
    env = os.environ if environ is None else environ
    for name in ("YUNQUE_THREADS", "OMP_NUM_THREADS"):
        raw = env.get(name, "").split(",")[0].strip()  # OMP_NUM_THREADS may list nested levels
        if raw.isdigit() and int(raw) > 0:
            return int(raw)
    return None


_torch_default: int | None = None  # torch's own count at first use, before any policy lowered it


class ThreadPolicy:
    """`update()` at step boundaries sets torch's thread count to the free cores; returns it.

    Cheap: two small /proc reads, at most once per `every` seconds. Off Linux, or with the count
    fixed by the user, it never changes torch's setting.
    """

    def __init__(
        self,
        every: float = 5.0,
        read: Callable[[], tuple[float, float] | None] = _read_proc,
        clock: Callable[[], float] = time.monotonic,
        set_threads: Callable[[int], None] | None = None,
    ):
        import torch

        global _torch_default
        if _torch_default is None:
            _torch_default = torch.get_num_threads()
        self.every, self._read, self._clock = every, read, clock
        self._set = set_threads or torch.set_num_threads
        self.fixed = fixed_threads()
        self.max_threads = min(_torch_default, len(_affinity()))
        self.threads = self._initial = torch.get_num_threads()
        self.others = 0.0  # cores' worth of CPU time other processes took in the last window
        self._last: tuple[float, float, float] | None = None

    def _sample(self) -> tuple[float, float, float] | None:
        r = self._read()
        return None if r is None else (self._clock(), *r)

    def start(self, window: float = 0.25) -> int:
        """Measure over `window` seconds now (before the first step), then set the count."""
        if self.fixed is None and (first := self._sample()) is not None:
            time.sleep(window)
            self._last = first
            self.update(force=True)
        return self.threads

    def close(self) -> None:
        """Give torch back the count it had, for whatever the process runs next."""
        if self.threads != self._initial:
            self._set(self._initial)
            self.threads = self._initial

    def update(self, force: bool = False) -> int:
        if self.fixed is not None:
            return self.threads
        if self._last is not None and not force and self._clock() - self._last[0] < self.every:
            return self.threads  # the window is still open: not even a /proc read
        now = self._sample()
        if now is None:
            return self.threads
        if self._last is None:
            self._last = now
            return self.threads
        dt = now[0] - self._last[0]
        ticks = dt * os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else dt * 100
        if ticks <= 0:
            return self.threads
        self.others = max(0.0, ((now[1] - self._last[1]) - (now[2] - self._last[2])) / ticks)
        self._last = now
        want = max(1, min(self.max_threads, int(self.max_threads - self.others + 0.5)))
        if want != self.threads:
            self._set(want)
            self.threads = want
        return self.threads


def fit_threads(model) -> int:
    """Before decoding on CPU: one measurement, then torch on the free cores; returns the count."""
    import torch

    if next(model.parameters()).device.type != "cpu":
        return torch.get_num_threads()
    return ThreadPolicy().start(window=0.2)
