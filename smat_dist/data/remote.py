"""HTTP(S) reads of remote datasets with a timeout per socket operation and bounded retries with backoff.

A read that stalls (a server that accepts the connection and never answers, or stops half-way through a body)
times out after `timeout_s` instead of holding a rank forever; a transient failure (timeout, refused or reset
connection, HTTP 5xx) is retried `retries` times, waiting backoff_s, 2*backoff_s, ... in between; a client
error (HTTP 4xx) is final at once. The last failure is raised as it came (an OSError: urllib's URLError,
HTTPError, TimeoutError, ...) with the number of tries in its message. The settings are data.remote_timeout_s
and data.remote_retries (smat_dist/config/schema.py), carried by EpisodeConfig into every reader.
"""
from __future__ import annotations

import http.client
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class RemotePolicy:
    timeout_s: float = 30.0   # per socket operation (connect, each read), not per request
    retries: int = 3          # further tries after the first
    backoff_s: float = 0.5    # wait before the first retry; doubles each time

    @classmethod
    def of(cls, data_cfg) -> "RemotePolicy":
        """The policy of a DataConfig (or of anything with remote_timeout_s / remote_retries)."""
        return cls(timeout_s=float(data_cfg.remote_timeout_s), retries=int(data_cfg.remote_retries))


def _transient(e: BaseException) -> bool:
    if isinstance(e, urllib.error.HTTPError):
        return e.code >= 500
    return isinstance(e, (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException))


def request(url: str, read: Callable[[http.client.HTTPResponse], T], *, headers: dict | None = None,
            method: str | None = None, policy: RemotePolicy | None = None) -> T:
    """`read(response)` of one HTTP request to `url`, retried under `policy` (see the module docstring)."""
    policy = policy or RemotePolicy()
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    for attempt in range(policy.retries + 1):
        try:
            with urllib.request.urlopen(req, timeout=policy.timeout_s) as r:
                return read(r)
        except (OSError, http.client.HTTPException) as e:
            if not _transient(e):
                raise
            if attempt == policy.retries:
                why = getattr(e, "reason", None) or e
                raise urllib.error.URLError(f"{why} ({policy.retries + 1} tries, timeout "
                                            f"{policy.timeout_s:g} s each)") from e
            time.sleep(policy.backoff_s * 2 ** attempt)
    raise AssertionError("unreachable")
