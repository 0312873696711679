"""The delivery interface, its two failure outcomes, and the policy-enforcing dispatcher.

Invariants:
- a handler's ``deliver(msg)`` either returns (the destination took the
  message), raises ``TemporaryFailure`` (try again later) or raises
  ``PermanentFailure`` (never retry); any other exception is a bug in the
  handler and the worker treats it as temporary;
- ``Dispatcher`` checks the exit's published policy *before* any handler is
  called, on every attempt (a policy narrowed after a message was queued
  still applies): a destination the policy does not allow, or a kind with no
  handler, is ``PermanentFailure(Reason.POLICY_DENIED)``;
- ``on_commit`` (optional, async): a handler whose destination takes the
  message at one step after a wait for its answer (SMTP: the final dot, then
  the server's reply) awaits ``on_commit(end_of_data)`` right before that
  step, so the worker can mark the message in flight; ``end_of_data`` is a
  plain function that takes the step at once without blocking (it does
  nothing when it would block or was called before): the worker calls it right
  after its mark is written, with no checkpoint between, and the handler takes
  whatever of the step is left once ``on_commit`` returns. When ``on_commit``
  raises a ``DeliveryFailure`` before calling it, the handler does not take that
  step (SMTP: closes without the dot) and fails the attempt with it; handlers
  without such a window ignore it;
- failure ``code``s are short stable strings (``policy_denied``,
  ``smtp_550``, ``http_404``, ``connect_failed``, ``timeout``, ...) that go into
  acks, logs and metrics; ``detail`` never contains local file-system paths.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

from ..errors import ConfigError, OverlayError, Reason
from ..records import DELIVERY_KINDS, policy_allows
from ..wire.delivery import Destination, ExitMessage, InvalidDestination, parse_destination


class DeliveryFailure(OverlayError):
    """A delivery attempt did not succeed. ``reason`` is a ``Reason`` or a short code string."""

    temporary: bool = True

    def __init__(self, reason: Reason | str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{self.code}: {detail}" if detail else self.code)

    @property
    def code(self) -> str:
        return self.reason.value if isinstance(self.reason, Reason) else str(self.reason)


class TemporaryFailure(DeliveryFailure):
    """The destination is unreachable or busy: retry later with backoff."""

    temporary = True


class PermanentFailure(DeliveryFailure):
    """The destination refused the message for good (or policy forbids it): give up."""

    temporary = False


EndOfData = Callable[[], None]
OnCommit = Callable[[EndOfData], Awaitable[None]]


@runtime_checkable
class DeliveryHandler(Protocol):
    """Delivers one message to one kind of destination."""

    async def deliver(self, msg: ExitMessage) -> None:
        """Deliver ``msg.body`` to ``msg.dest``; raise ``TemporaryFailure``/``PermanentFailure``."""
        ...


class Dispatcher:
    """Routes a message to the handler for its destination kind, enforcing the exit policy.

    ``policy`` is the exit's published rule list (``kind:glob``, as in the
    membership record); ``handlers`` maps a kind (``smtp``, ``maildir``,
    ``http``, ``https``) to its handler. A kind without a handler is denied even
    if the policy names it: an exit must not publish what it cannot deliver.
    """

    def __init__(self, policy: Iterable[str], handlers: Mapping[str, DeliveryHandler]) -> None:
        self.policy: tuple[str, ...] = tuple(policy)
        unknown = set(handlers) - set(DELIVERY_KINDS)
        if unknown:
            raise ValueError(f"unknown delivery kinds {sorted(unknown)}")
        self.handlers: dict[str, DeliveryHandler] = dict(handlers)

    def check(self, msg: ExitMessage | Destination) -> Destination:
        """The parsed destination if this exit delivers to it, else ``PermanentFailure``."""
        if isinstance(msg, Destination):
            dest = msg
        else:
            try:
                dest = parse_destination(msg.destination)
            except InvalidDestination as e:
                raise PermanentFailure(Reason.MALFORMED, e.detail) from None
        if dest.kind not in self.handlers:
            raise PermanentFailure(Reason.POLICY_DENIED, f"this exit does not deliver {dest.kind}")
        if not policy_allows(self.policy, dest.kind, dest.policy_subject):
            raise PermanentFailure(Reason.POLICY_DENIED, f"{dest.kind} destination not in policy")
        return dest

    def allows(self, msg: ExitMessage | Destination) -> bool:
        try:
            self.check(msg)
        except PermanentFailure:
            return False
        return True

    async def deliver(self, msg: ExitMessage, *, on_commit: OnCommit | None = None) -> None:
        """Check the policy, then deliver through the kind's handler (passing
        ``on_commit`` to handlers that take it)."""
        dest = self.check(msg)
        handler = self.handlers[dest.kind]
        if on_commit is not None and _takes_on_commit(handler):
            await handler.deliver(msg, on_commit=on_commit)
        else:
            await handler.deliver(msg)


def _takes_on_commit(handler: DeliveryHandler) -> bool:
    try:
        return "on_commit" in inspect.signature(handler.deliver).parameters
    except (TypeError, ValueError):
        return False


def parse_hostport(text: str, default_port: int) -> tuple[str, int]:
    """``"host:port"``, ``"host"`` or ``"[v6]:port"`` -> ``(host, port)``; ``ValueError`` if bad."""
    text = text.strip()
    if text.startswith("["):
        host, close, tail = text[1:].partition("]")
        if not close or (tail and not tail.startswith(":")):
            raise ValueError(f"bad host:port {text!r}")
        port_s = tail[1:]
    else:
        host, _, port_s = text.rpartition(":") if ":" in text else (text, "", "")
    if not host:
        raise ValueError(f"bad host:port {text!r}")
    port = int(port_s) if port_s else default_port
    if not 0 < port < 65536:
        raise ValueError(f"bad port in {text!r}")
    return host, port


def smtp_password(cfg) -> str | None:
    """The smarthost's AUTH password from ``[exit] smtp_password_file`` or
    ``smtp_password_env`` (None without ``smtp_username``). ``ConfigError`` names
    the file or variable, never the password."""
    if not getattr(cfg, "smtp_username", ""):
        return None
    if cfg.smtp_password_file:
        path = Path(cfg.smtp_password_file).expanduser()
        try:
            text = path.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) else "not UTF-8"
            raise ConfigError(f"[exit] smtp_password_file {path}: {why}") from None
        password = text.rstrip("\r\n")
        where = f"file {path}"
    else:
        password = os.environ.get(cfg.smtp_password_env, "")
        where = f"environment variable {cfg.smtp_password_env}"
    if not password:
        raise ConfigError(f"[exit] no SMTP password in {where}")
    return password


def build_dispatcher(
    policy: Iterable[str],
    *,
    smtp_relay: str = "",
    maildir_root: str = "",
    exit_address: str = "hydra-exit@localhost",
    smtp_timeout: float = 60.0,
    http_timeout: float = 30.0,
    config=None,
) -> Dispatcher:
    """A dispatcher from the node config (``[exit]`` section).

    Handlers are created only for kinds the policy names; ``maildir`` needs a
    root (without one, maildir rules are denied). ``config`` (a ``Config``)
    supplies the mail identity, TLS mode and smarthost login
    (``smtp_from``, ``smtp_helo``, ``smtp_starttls``, ``smtp_username`` and
    the password from ``smtp_password_file``/``smtp_password_env``); the
    explicit ``smtp_relay``/``maildir_root`` arguments win over it.
    """
    from .maildir import MaildirHandler
    from .smtp import SmtpHandler
    from .webhook import WebhookHandler

    policy = tuple(policy)
    kinds = {rule.partition(":")[0] for rule in policy}
    handlers: dict[str, DeliveryHandler] = {}
    if "smtp" in kinds:
        relay = parse_hostport(smtp_relay, 25) if smtp_relay else None
        smtp: dict = {"exit_address": exit_address}
        if config is not None:
            smtp = {
                "exit_address": config.smtp_from or exit_address,
                "helo_name": config.smtp_helo or None,
                "starttls": config.smtp_starttls,
                "username": config.smtp_username or None,
                "password": smtp_password(config),
            }
        handlers["smtp"] = SmtpHandler(relay=relay, timeout=smtp_timeout, **smtp)
    if "maildir" in kinds and maildir_root:
        handlers["maildir"] = MaildirHandler(maildir_root)
    if kinds & {"http", "https"}:
        hook = WebhookHandler(timeout=http_timeout)
        for k in ("http", "https"):
            if k in kinds:
                handlers[k] = hook
    return Dispatcher(policy, handlers)
