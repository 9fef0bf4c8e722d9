"""Failed authentications per source address: past a burst, the source is refused (429) without its
credentials being checked, so guessing API keys or device secrets learns nothing and costs no query."""

import hashlib
import logging
import math
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from prometheus_client import Counter

log = logging.getLogger(__name__)

# Defined here rather than in metrics.py, which imports deps.py, which imports this module.
FAILURES = Counter("diredi_api_auth_failures_total", "Requests whose credentials were refused (401)")
LIMITED = Counter(
    "diredi_api_auth_sources_limited_total", "Times a source address reached the failed-authentication burst"
)
REFUSED = Counter(
    "diredi_api_auth_refused_total", "Requests refused with 429 without their credentials being checked"
)

MAX_SOURCES = 4096  # tracked addresses, at most `burst` timestamps each: ~1.5 KB each at 20, ~6 MB in all
MAX_KNOWN = 4096  # credentials remembered as valid
KNOWN_SECONDS = 24 * 3600.0


class AuthGuard:
    """Counts failed authentications per source address over a sliding window of `window` seconds.

    A source with `burst` failures in the window is limited until the oldest of them leaves the window.
    Credentials this process has verified as valid within `known_seconds` still pass a limited source's
    guard (and are then checked as usual), so valid clients behind the same NAT as a brute-forcer keep
    working; a guess never passes, because it was never valid.

    One guard per API process: each uvicorn worker counts alone, so the effective burst is
    burst × workers. At most `max_sources` addresses are tracked, the least recently seen evicted first
    (an attacker who can churn that many addresses is not slowed by any per-address limit anyway).
    Used from the event loop only, so it takes no lock.
    """

    def __init__(
        self,
        burst: int,
        window: float,
        *,
        max_sources: int = MAX_SOURCES,
        max_known: int = MAX_KNOWN,
        known_seconds: float = KNOWN_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst = burst
        self.window = window
        self.max_sources = max_sources
        self.max_known = max_known
        self.known_seconds = known_seconds
        self.clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._known: OrderedDict[bytes, float] = OrderedDict()
        # Credentials are remembered by a keyed hash: the process's memory holds no usable secret.
        self._salt = secrets.token_bytes(16)

    def refusal(self, source: str, credentials: str) -> int | None:
        """The Retry-After (whole seconds) to refuse a request from `source` with, without checking its
        `credentials`; None when they are to be checked: the source is not limited, or they are known."""
        wait = self.retry_after(source)
        if wait is None or (credentials and self.known(credentials)):
            return None
        REFUSED.inc()
        return wait

    def retry_after(self, source: str) -> int | None:
        """Whole seconds until `source` may present credentials again, or None when it may now."""
        times = self._failures.get(source)
        if times is None:
            return None
        self._prune(times)
        if not times:
            del self._failures[source]
            return None
        self._failures.move_to_end(source)  # a source still knocking is not the one to evict
        if len(times) < self.burst:
            return None
        return max(1, math.ceil(times[0] + self.window - self.clock()))

    def failed(self, source: str) -> None:
        """Count a refused authentication from `source`; log once when it becomes limited."""
        times = self._failures.get(source)
        if times is None:
            times = self._failures[source] = deque(maxlen=self.burst)
            if len(self._failures) > self.max_sources:
                self._failures.popitem(last=False)
        else:
            self._failures.move_to_end(source)
            self._prune(times)
        limited = len(times) >= self.burst  # requests already past the guard when the burst was reached
        times.append(self.clock())
        FAILURES.inc()
        if not limited and len(times) >= self.burst:
            LIMITED.inc()
            log.warning(
                "source %s limited: %d failed authentications within %g s; it gets 429 until they age out",
                source,
                len(times),
                self.window,
            )

    def remember(self, credentials: str) -> None:
        """Remember that `credentials` (the Authorization header) were just verified as valid."""
        digest = self._digest(credentials)
        self._known[digest] = self.clock() + self.known_seconds
        self._known.move_to_end(digest)
        if len(self._known) > self.max_known:
            self._known.popitem(last=False)

    def known(self, credentials: str) -> bool:
        """Whether `credentials` were verified as valid within `known_seconds`."""
        until = self._known.get(self._digest(credentials))
        return until is not None and self.clock() < until

    def _prune(self, times: deque[float]) -> None:
        horizon = self.clock() - self.window
        while times and times[0] <= horizon:
            times.popleft()

    def _digest(self, credentials: str) -> bytes:
        return hashlib.blake2b(credentials.encode(), key=self._salt, digest_size=16).digest()
