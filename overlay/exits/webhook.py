"""HTTP(S) webhook delivery: POST the body to the destination URL with httpx.

The request: ``POST <url>`` with the body bytes exactly as the request
content, and headers ``Content-Type: application/octet-stream``,
``Idempotency-Key: <message id hex>`` and ``X-Hydra-Message-Id: <message id
hex>`` (the same on every retry, so a receiver can drop repeats), plus a
``User-Agent``. Redirects are not followed; the response body is not read.

Outcome: 2xx delivered; 408, 425, 429, 5xx, timeouts and connection/TLS
errors are ``TemporaryFailure``; 3xx and every other 4xx are ``PermanentFailure``.
"""

from __future__ import annotations

from collections.abc import Mapping

import httpx

from ..wire.delivery import ExitMessage
from .handlers import PermanentFailure, TemporaryFailure

_TEMPORARY_4XX = {408, 425, 429}


class WebhookHandler:
    """Delivers ``http://`` and ``https://`` destinations.

    Pass ``client`` to share a connection pool (its lifetime is the caller's);
    otherwise a short-lived client is made per delivery.
    """

    def __init__(
        self,
        *,
        client: httpx.AsyncClient | None = None,
        timeout: float = 30.0,
        verify: bool = True,
        headers: Mapping[str, str] | None = None,
        user_agent: str = "hydra-exit/1",
    ) -> None:
        self.client = client
        self.timeout = timeout
        self.verify = verify
        self.headers = dict(headers or {})
        self.user_agent = user_agent

    async def deliver(self, msg: ExitMessage) -> None:
        dest = msg.dest
        if dest.kind not in ("http", "https") or dest.url is None:
            raise PermanentFailure("wrong_handler", f"webhook handler got {dest.kind}")
        headers = {
            **self.headers,
            "Content-Type": "application/octet-stream",
            "Idempotency-Key": msg.id_hex,
            "X-Hydra-Message-Id": msg.id_hex,
            "User-Agent": self.user_agent,
        }
        try:
            if self.client is not None:
                status = await self._post(self.client, dest.url, msg.body, headers)
            else:
                async with httpx.AsyncClient(
                    timeout=self.timeout, verify=self.verify, trust_env=False
                ) as client:
                    status = await self._post(client, dest.url, msg.body, headers)
        except httpx.TimeoutException:
            raise TemporaryFailure("timeout", dest.host or "") from None
        except httpx.TransportError as e:
            raise TemporaryFailure("connect_failed", f"{dest.host}: {type(e).__name__}") from None
        except (httpx.HTTPError, httpx.InvalidURL) as e:
            raise PermanentFailure("http_error", type(e).__name__) from None
        if 200 <= status <= 299:
            return
        if status >= 500 or status in _TEMPORARY_4XX:
            raise TemporaryFailure(f"http_{status}", dest.host or "")
        raise PermanentFailure(f"http_{status}", dest.host or "")

    async def _post(
        self, client: httpx.AsyncClient, url: str, body: bytes, headers: dict[str, str]
    ) -> int:
        async with client.stream(
            "POST", url, content=body, headers=headers, follow_redirects=False
        ) as resp:
            return resp.status_code
