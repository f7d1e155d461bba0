"""Bandwidth limits in bytes per second: a token bucket that trio tasks draw from before moving bytes."""

from __future__ import annotations

import trio


class RateLimiter:
    """A token bucket holding at most *burst* bytes, refilled at *rate* bytes/s; rate 0 means unlimited.

    Callers acquire what they are about to send or receive; a request larger than the bucket waits for
    the debt it leaves, so the long-run rate never exceeds *rate*.
    """

    def __init__(self, rate: float, burst: int | None = None) -> None:
        if rate < 0:
            raise ValueError(f"negative rate limit {rate}")
        self.rate = float(rate)
        self.burst = burst if burst is not None else max(int(rate / 20), 64 << 10)  # ~50 ms of traffic
        self._tokens = float(self.burst)
        self._stamp: float | None = None  # set on first use, inside the trio loop
        self._lock = trio.Lock()

    @property
    def unlimited(self) -> bool:
        """Whether no limit applies."""
        return self.rate == 0

    async def acquire(self, amount: int) -> None:
        """Wait until *amount* bytes may move."""
        if self.unlimited or amount <= 0:
            return
        async with self._lock:  # first come, first served
            now = trio.current_time()
            elapsed = 0.0 if self._stamp is None else now - self._stamp
            self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate)
            self._stamp = now
            self._tokens -= amount
            if self._tokens < 0:
                await trio.sleep(-self._tokens / self.rate)
