"""A Python HTTP client for the service that sends a request again when no replica answered it.

Behind the HAProxy ingress a replica that dies (crash, OOM kill, node loss) takes its requests in
flight with it. The ingress resends by itself only a request whose connection to a replica failed
or closed empty; otherwise the client sees one of:

- its connection closed before an answer, or in the middle of one;
- a 5xx answered by the ingress itself (HAProxy 2.8 turns a replica's reset connection into 502,
  which Serve's template rewrites to 500). Every answer a replica sends carries an
  ``X-Request-Id`` header; the ingress's own error pages do not, so that header tells them apart.

Sending a request again is safe: scoring, recommending and reading or forgetting a user are
idempotent, and an event sent twice is stored once when it carries its ``timestamp`` (one without
is stamped on arrival, so a resend may store it twice). A 5xx a replica answered (it has
``X-Request-Id``) is the service's answer and is returned as it is, like every other status.
"""

from __future__ import annotations

import time
from typing import Any

import requests

REPLICA_HEADER = "X-Request-Id"  # set by Serve on every answer a replica sends


def from_ingress(response: requests.Response) -> bool:
    """Whether ``response`` is an error the ingress made up because no replica answered."""
    return response.status_code >= 500 and REPLICA_HEADER not in response.headers


class RetryingSession(requests.Session):
    """A `requests.Session` that sends a request up to ``tries`` times in all when its connection
    was refused, reset or closed before a full answer, or the ingress answered in a replica's place
    (`from_ingress`), waiting ``pause_s`` (doubling) between tries. The last try's answer or error
    goes to the caller. The caller's own ``timeout`` running out is not resent: the request may
    still be running."""

    def __init__(self, tries: int = 3, pause_s: float = 0.1) -> None:
        super().__init__()
        if tries < 1:
            raise ValueError(f"tries must be at least 1, got {tries}")
        self.tries, self.pause_s = tries, pause_s

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        for attempt in range(self.tries):
            last = attempt == self.tries - 1
            try:
                response = super().request(method, url, *args, **kwargs)
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError):  # not ReadTimeout
                if last:
                    raise
            else:
                if last or not from_ingress(response):
                    return response
                response.close()
            time.sleep(self.pause_s * 2**attempt)
        raise AssertionError("unreachable: the last try returns or raises")


def retrying_session(tries: int = 3, pause_s: float = 0.1) -> RetryingSession:
    """A session for the service's HTTP API that survives a replica lost under load (see the
    module's docstring); use it like `requests.Session` (``session.post(url, json=..., headers=...)``)."""
    return RetryingSession(tries, pause_s)
