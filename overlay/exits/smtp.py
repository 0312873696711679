"""SMTP delivery: hand a message to the destination's mail servers, or to a smarthost.

What the recipient sees (``render`` decides, purely from the body), in the
remailer tradition: the user's words and subject travel, nothing that
identifies the user or their machine does.

1. **Message** – when the body is an RFC 5322 message: a header section
   (``Name: value`` lines, folded lines, at least one of From/To/Cc/Subject/
   Date/Message-ID/MIME-Version/Reply-To/Sender), then a blank line and the
   body. Line endings are normalised first (a bare LF or CR becomes CRLF), so
   an ``.eml`` file or ``echo`` text with Unix line endings qualifies. The
   header section is rebuilt: the exit's own ``From`` (``exit_address``,
   ``[exit] smtp_from``), ``To`` (the destination), ``Date`` (the attempt)
   and ``Message-ID``, then the user's *safe* fields, in their order and
   folding: ``Subject``, ``In-Reply-To``, ``References``, ``MIME-Version`` and
   every ``Content-*`` field. Everything else (``From``, ``Sender``,
   ``Reply-To``, ``Received``, ``Return-Path``, the user's ``Date`` and
   ``Message-ID``, ``X-*``, ``User-Agent``, DKIM signatures, ``To``/``Cc``/
   ``Bcc``, ...) is dropped. The body follows unchanged. A result that SMTP
   cannot carry (a line over 998 octets, a NUL) is wrapped instead.
   (``SmtpHandler(verbatim=False)`` wraps every body.)
2. **Wrapped** – anything else (a body that is not a message) gets these
   headers, in this order, then a blank line, then the body::

       From: <exit_address>                 (default hydra-exit@localhost)
       To: <user@host>
       Subject: <subject>                   (default "Message via Hydra")
       Date: <RFC 5322 date of the attempt, GMT>
       Message-ID: <HEX_MESSAGE_ID@hydra.invalid>
       MIME-Version: 1.0
       Content-Type: ...
       Content-Transfer-Encoding: ...

   - ASCII text (line endings normalised to CRLF, a final one added, lines
     <= 998) or empty: ``text/plain; charset=us-ascii``, ``7bit``; the
     normalised body follows;
   - other valid UTF-8: ``text/plain; charset=utf-8``, ``base64`` of the body;
   - anything else: ``application/octet-stream``, ``base64``, plus
     ``Content-Disposition: attachment; filename="hydra-message.bin"``.

Every copy of a message, whichever exit sends it and however often, carries
the same ``Message-ID: <HEX_MESSAGE_ID@hydra.invalid>`` (the overlay message
id), so a receiver can drop duplicates. 8-bit content is announced with
``BODY=8BITMIME`` when the server offers it.

Where it goes: through ``relay`` (``[exit] smtp_relay``, a smarthost) when
set; else, for a destination domain on port 25, to the domain's MX hosts in
preference order (``overlay.exits.mx``; an address or an explicit other port
is dialled directly). Each MX host's addresses are tried in turn while the
failure is a connection failure or a 4xx greeting; a refusal later in the
transaction ends the attempt.

The envelope is ``MAIL FROM:<exit_address>`` ``RCPT TO:<user@host>``; bounces
go to the exit address. ``starttls``: ``opportunistic`` (use it when offered,
no certificate check), ``required`` (verified STARTTLS or a temporary
failure), ``tls`` (implicit TLS from the first byte, port 465, verified) or
``off``. ``username``/``password`` log in (AUTH) after TLS; the password is
never put in an error, a log line or an acknowledgement. Reply codes 4xx,
connection failures, DNS errors, timeouts and disconnects are
``TemporaryFailure``; 5xx is ``PermanentFailure``.

The end of data: the content is written, then ``on_commit(end_of_data)`` is
awaited (the worker marks the message in flight and calls ``end_of_data``
right after, on the event loop's thread: the final ``.`` goes out then, with
nothing run in between, when the socket takes it without blocking), then
whatever of the ``.`` is left is sent and the server's answer awaited (the
end-of-data window: as long as the server takes, seconds for servers that
filter before answering, RFC 1047).

``smtplib`` runs in a worker thread (``trio.to_thread.run_sync``) that is not
abandoned on cancellation: a send that started finishes (bounded by
``timeout``) so its outcome is not lost.
"""

from __future__ import annotations

import base64
import contextlib
import re
import select
import smtplib
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate
from typing import Literal

import trio

from ..wire.delivery import Destination, ExitMessage
from .handlers import OnCommit, PermanentFailure, TemporaryFailure
from .mx import MxResolver, is_ip_literal

MAX_LINE = 998
_FIELD_RE = re.compile(rb"[\x21-\x39\x3b-\x7e]+:")
_MESSAGE_FIELDS = {
    b"from",
    b"to",
    b"cc",
    b"subject",
    b"date",
    b"message-id",
    b"mime-version",
    b"reply-to",
    b"sender",
}
MESSAGE_ID_DOMAIN = "hydra.invalid"
# the user's header fields that travel (lower case); and every Content-* field
SAFE_FIELDS = {b"subject", b"in-reply-to", b"references", b"mime-version"}
STARTTLS_MODES = ("off", "opportunistic", "required", "tls")
_EOL_RE = re.compile(rb"\r\n|\r|\n")

Form = Literal["message", "wrapped-7bit", "wrapped-base64-text", "wrapped-base64-binary"]


def smtp_safe(data: bytes) -> bool:
    """Whether SMTP DATA carries ``data`` unchanged: CRLF lines <= 998 octets, no NUL, ends CRLF."""
    if not data:
        return True
    if b"\0" in data or not data.endswith(b"\r\n"):
        return False
    lines = data[:-2].split(b"\r\n")
    return all(b"\r" not in ln and b"\n" not in ln and len(ln) <= MAX_LINE for ln in lines)


def looks_like_message(body: bytes) -> bool:
    """Whether ``body`` is an SMTP-safe RFC 5322 message (header section first)."""
    if not body or not smtp_safe(body):
        return False
    head = body.split(b"\r\n\r\n", 1)[0]
    if head.endswith(b"\r\n"):
        head = head[:-2]
    names = set()
    for i, line in enumerate(head.split(b"\r\n")):
        if line[:1] in (b" ", b"\t"):
            if i == 0:
                return False
            continue
        m = _FIELD_RE.match(line)
        if not m:
            return False
        names.add(m.group()[:-1].lower())
    return bool(names & _MESSAGE_FIELDS)


def normalise_eol(data: bytes) -> bytes:
    """Every line ending (CRLF, bare LF, bare CR) as CRLF."""
    return _EOL_RE.sub(b"\r\n", data)


def _fields(head: bytes) -> list[tuple[bytes, bytes]]:
    """``(lower-case name, whole field with its folded lines and CRLF)`` in order."""
    out: list[tuple[bytes, bytes]] = []
    for line in head.split(b"\r\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t") and out:
            name, text = out[-1]
            out[-1] = (name, text + line + b"\r\n")
        else:
            out.append((line.partition(b":")[0].strip().lower(), line + b"\r\n"))
    return out


def safe_fields(head: bytes) -> bytes:
    """The user's fields that travel (see the module docstring), in their order."""
    return b"".join(
        text for name, text in _fields(head) if name in SAFE_FIELDS or name.startswith(b"content-")
    )


@dataclass(frozen=True, slots=True)
class SmtpContent:
    form: Form
    data: bytes  # exactly the DATA content (before dot-stuffing)
    eight_bit: bool


def _b64_lines(body: bytes) -> bytes:
    enc = base64.b64encode(body)
    return b"".join(enc[i : i + 76] + b"\r\n" for i in range(0, len(enc), 76))


def rcpt_address(dest: Destination) -> str:
    local, _, _ = dest.target.rpartition("@")
    if dest.host and ":" in dest.host:
        return f"{local}@[IPv6:{dest.host}]"
    return dest.target


def message_id_header(msg: ExitMessage) -> str:
    """The same on every copy of the message (see the module docstring)."""
    return f"Message-ID: <{msg.message_id.hex()}@{MESSAGE_ID_DOMAIN}>"


def render(
    msg: ExitMessage,
    dest: Destination,
    *,
    exit_address: str = "hydra-exit@localhost",
    subject: str = "Message via Hydra",
    verbatim: bool = True,
    now: float | None = None,
) -> SmtpContent:
    """The DATA content for ``msg`` (see the module docstring). Pure apart from the Date."""
    body = msg.body
    ours = [
        f"From: {exit_address}",
        f"To: {dest.target}",
        f"Date: {formatdate(now, usegmt=True)}",
        message_id_header(msg),
    ]
    if verbatim and body:
        text = normalise_eol(body)
        if not text.endswith(b"\r\n"):
            text += b"\r\n"
        if looks_like_message(text):
            head, sep, rest = text.partition(b"\r\n\r\n")
            if not sep and head.endswith(b"\r\n"):
                head = head[:-2]
            data = "".join(h + "\r\n" for h in ours).encode("ascii") + safe_fields(head)
            data += b"\r\n" + rest
            if smtp_safe(data):
                return SmtpContent("message", data, any(b > 127 for b in data))
    headers = [ours[0], ours[1], f"Subject: {subject}", ours[2], ours[3], "MIME-Version: 1.0"]
    text = normalise_eol(body)
    if text and not text.endswith(b"\r\n"):
        text += b"\r\n"
    if body.isascii() and smtp_safe(text):
        form: Form = "wrapped-7bit"
        headers += ["Content-Type: text/plain; charset=us-ascii", "Content-Transfer-Encoding: 7bit"]
        payload = text
    else:
        try:
            body.decode("utf-8")
            form = "wrapped-base64-text"
            headers.append("Content-Type: text/plain; charset=utf-8")
        except UnicodeDecodeError:
            form = "wrapped-base64-binary"
            headers += [
                "Content-Type: application/octet-stream",
                'Content-Disposition: attachment; filename="hydra-message.bin"',
            ]
        headers.append("Content-Transfer-Encoding: base64")
        payload = _b64_lines(body)
    head = "".join(h + "\r\n" for h in headers).encode("ascii")
    return SmtpContent(form, head + b"\r\n" + payload, False)


def _classify(code: int, text: bytes | str, what: str) -> Exception:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    detail = f"{what}: {' '.join(str(text).split())}"[:160]
    if 500 <= code <= 599:
        return PermanentFailure(f"smtp_{code}", detail)
    return TemporaryFailure(f"smtp_{code}", detail)


def dot_stuff(data: bytes) -> bytes:
    """``data`` as SMTP DATA content, without the final dot: leading dots doubled,
    ending in CRLF."""
    q = re.sub(rb"(?m)^\.", b"..", data)
    return q if q.endswith(b"\r\n") or not q else q + b"\r\n"


@dataclass(frozen=True, slots=True)
class Target:
    """One server to try: where to connect, and the name its certificate must carry."""

    address: str
    port: int
    name: str


class SmtpHandler:
    """Delivers ``smtp:`` destinations (see the module docstring).

    ``relay=(host, port)`` sends everything through that server; otherwise a
    destination domain on port 25 goes to its MX hosts (``resolver``, default
    the system's name servers) and anything else straight to ``host:port``.
    """

    def __init__(
        self,
        *,
        exit_address: str = "hydra-exit@localhost",
        relay: tuple[str, int] | None = None,
        subject: str = "Message via Hydra",
        verbatim: bool = True,
        timeout: float = 60.0,
        starttls: Literal["off", "opportunistic", "required", "tls"] = "opportunistic",
        username: str | None = None,
        password: str | None = None,
        helo_name: str | None = None,
        resolver: MxResolver | None = None,
    ) -> None:
        if starttls not in STARTTLS_MODES:
            raise ValueError("starttls must be off, opportunistic, required or tls")
        for text in (exit_address, subject):
            if not text.isascii() or not text.isprintable():
                raise ValueError("exit_address and subject must be printable ASCII, one line")
        self.exit_address = exit_address
        self.relay = relay
        self.subject = subject
        self.verbatim = verbatim
        self.timeout = timeout
        self.starttls = starttls
        self.username = username
        self.password = password
        self.helo_name = helo_name or None
        self.resolver = resolver

    def __repr__(self) -> str:  # never shows the password
        return (
            f"SmtpHandler(exit_address={self.exit_address!r}, relay={self.relay!r},"
            f" starttls={self.starttls!r}, username={self.username!r})"
        )

    async def deliver(self, msg: ExitMessage, on_commit: OnCommit | None = None) -> None:
        dest = msg.dest
        if dest.kind != "smtp":
            raise PermanentFailure("wrong_handler", f"smtp handler got {dest.kind}")
        content = render(
            msg, dest, exit_address=self.exit_address, subject=self.subject, verbatim=self.verbatim
        )

        def commit(end_of_data: Callable[[], None]) -> None:
            if on_commit is not None:
                trio.from_thread.run(on_commit, end_of_data)

        await trio.to_thread.run_sync(self._deliver_sync, dest, content, commit)

    def _deliver_sync(self, dest: Destination, content: SmtpContent, commit) -> None:
        rcpt = rcpt_address(dest)
        for target, last in self._targets(dest):
            try:
                self._send(target, rcpt, content, commit)
                return
            except _NextTarget as e:
                if last:
                    raise e.failure from None

    def _targets(self, dest: Destination):
        """``(Target, is_last)`` in the order to try them."""
        if self.relay is not None:
            host, port = self.relay
            yield Target(host, port, host), True
            return
        host, port = dest.host or "", dest.port or 25
        if port != 25 or is_ip_literal(host) or host == "localhost":
            yield Target(host, port, host), True
            return
        resolver = self.resolver or MxResolver(timeout=min(self.timeout, 10.0))
        targets = [
            Target(addr, 25, mx.name) for mx in resolver.mail_hosts(host) for addr in mx.addresses
        ]
        for i, t in enumerate(targets):
            yield t, i == len(targets) - 1

    def _tls_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        if self.starttls == "opportunistic":
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def _connect(self, target: Target) -> smtplib.SMTP:
        """A connected session past its greeting; ``_NextTarget`` if this server
        cannot be reached or will not talk now."""
        where = f"{target.name}:{target.port}"
        try:
            if self.starttls == "tls":
                conn: smtplib.SMTP = smtplib.SMTP_SSL(
                    local_hostname=self.helo_name, timeout=self.timeout, context=self._tls_context()
                )
            else:
                conn = smtplib.SMTP(local_hostname=self.helo_name, timeout=self.timeout)
            conn._host = target.name  # the name TLS checks the certificate against
            code, text = conn.connect(target.address, target.port)
        except ConnectionRefusedError:
            raise _NextTarget(TemporaryFailure("connect_refused", where)) from None
        except TimeoutError:
            raise _NextTarget(TemporaryFailure("timeout", where)) from None
        except smtplib.SMTPServerDisconnected:
            raise _NextTarget(TemporaryFailure("smtp_disconnected", where)) from None
        except (OSError, ssl.SSLError) as e:
            failure = TemporaryFailure("connect_failed", f"{where}: {type(e).__name__}")
            raise _NextTarget(failure) from None
        conn._host = target.name
        with contextlib.suppress(OSError):  # the end of data is a write of its own: no Nagle wait
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if code != 220:
            _close(conn)
            failure = _classify(code, text, "greeting")
            if isinstance(failure, PermanentFailure):
                raise failure
            raise _NextTarget(failure)
        return conn

    def _send(self, target: Target, rcpt: str, content: SmtpContent, commit) -> None:
        conn = self._connect(target)
        where = f"{target.name}:{target.port}"
        try:
            conn.ehlo_or_helo_if_needed()
            if self.starttls in ("opportunistic", "required") and conn.has_extn("starttls"):
                conn.starttls(context=self._tls_context())
                conn.ehlo()
            elif self.starttls == "required":
                raise TemporaryFailure("smtp_no_starttls", f"{where} does not offer STARTTLS")
            if self.username is not None:
                try:
                    conn.login(self.username, self.password or "")
                except (smtplib.SMTPAuthenticationError, smtplib.SMTPServerDisconnected) as e:
                    code = getattr(e, "smtp_code", "disconnected")
                    raise TemporaryFailure(
                        "smtp_auth_failed", f"login at {where}: {code}"
                    ) from None
            opts = ["BODY=8BITMIME"] if content.eight_bit and conn.has_extn("8bitmime") else []
            code, text = conn.mail(self.exit_address, opts)
            if code != 250:
                raise _classify(code, text, "MAIL")
            code, text = conn.rcpt(rcpt)
            if code not in (250, 251):
                raise _classify(code, text, "RCPT")
            code, text = conn.docmd("data")
            if code != 354:
                raise _classify(code, text, "DATA")
            conn.send(dot_stuff(content.data))
            end = _EndOfData(conn)
            commit(end.now)  # from here the server may take the message whatever happens to us
            end.rest()
            code, text = conn.getreply()
            if code != 250:
                raise _classify(code, text, "end of data")
        except (TemporaryFailure, PermanentFailure):
            _close(conn)
            raise
        except smtplib.SMTPAuthenticationError as e:
            _close(conn)
            raise TemporaryFailure("smtp_auth_failed", f"login at {where}: {e.smtp_code}") from None
        except smtplib.SMTPResponseException as e:
            _close(conn)
            raise _classify(e.smtp_code, e.smtp_error, type(e).__name__) from None
        except smtplib.SMTPServerDisconnected:
            _close(conn)
            raise TemporaryFailure("smtp_disconnected", where) from None
        except TimeoutError:
            _close(conn)
            raise TemporaryFailure("timeout", where) from None
        except smtplib.SMTPException as e:  # (an OSError subclass: must come first)
            _close(conn)
            raise TemporaryFailure("smtp_error", type(e).__name__) from None
        except (OSError, ssl.SSLError) as e:
            _close(conn)
            raise TemporaryFailure("connect_failed", f"{where}: {type(e).__name__}") from None
        try:
            conn.quit()
        except (smtplib.SMTPException, OSError):
            _close(conn)


class _NextTarget(Exception):
    """This server could not be reached: try the next one, else fail with ``failure``."""

    def __init__(self, failure: TemporaryFailure) -> None:
        super().__init__(str(failure))
        self.failure = failure


class _EndOfData:
    """The final ``.`` of a transaction, sent once: ``now`` (from the event loop's
    thread, right after the in-flight mark) sends it only if the socket takes it
    without blocking; ``rest`` (the delivery thread, afterwards) sends it if
    ``now`` did not. A socket error in ``now`` is left to the reply to show."""

    DOT = b".\r\n"

    def __init__(self, conn: smtplib.SMTP) -> None:
        self.conn = conn
        self.sent = False

    def now(self) -> None:
        if self.sent or self.conn.sock is None:
            return
        try:
            poll = select.poll()
            poll.register(self.conn.sock, select.POLLOUT)
            if not poll.poll(0):
                return  # a full send buffer: the delivery thread sends it
            self.sent = True
            self.conn.sock.sendall(self.DOT)  # 3 bytes (a TLS record) into free buffer space
        except (OSError, ValueError):
            pass

    def rest(self) -> None:
        if not self.sent:
            self.sent = True
            self.conn.send(self.DOT)


def _close(conn: smtplib.SMTP) -> None:
    try:
        conn.close()
    except OSError:
        pass
