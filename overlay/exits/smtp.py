"""SMTP delivery: hand a message to the destination's mail server, or to a relay.

What the recipient sees (``render`` decides, purely from the body):

1. **Verbatim** – when the body already is an RFC 5322 message that SMTP can
   carry unchanged: a header section (``Name: value`` lines, folded lines,
   at least one of From/To/Cc/Subject/Date/Message-ID/MIME-Version/Reply-To/
   Sender), every line ending in CRLF (no bare CR or LF), no NUL, no line over
   998 octets, ending in CRLF. The DATA content is exactly the body; the
   receiving server adds only its own trace headers (``Received:``) as it
   does for all mail. 8-bit bodies are announced with ``BODY=8BITMIME`` when
   the server offers it. (``SmtpHandler(verbatim=False)`` disables this form.)
2. **Wrapped** – anything else gets these headers, in this order, then a blank
   line, then the body::

       From: <exit_address>                 (default hydra-exit@localhost)
       To: <user@host>
       Subject: <subject>                   (default "Message via Hydra")
       Date: <RFC 5322 date of the attempt, GMT>
       Message-ID: <HEX_MESSAGE_ID@hydra.invalid>   (same on every retry)
       MIME-Version: 1.0
       Content-Type: ...
       Content-Transfer-Encoding: ...

   - body that is 7-bit ASCII and SMTP-safe (CRLF lines, as above) or empty:
     ``text/plain; charset=us-ascii``, ``7bit``; the body follows unchanged;
   - other valid UTF-8 (e.g. LF line endings, non-ASCII text):
     ``text/plain; charset=utf-8``, ``base64``;
   - anything else: ``application/octet-stream``, ``base64``, plus
     ``Content-Disposition: attachment; filename="hydra-message.bin"``.

   In every wrapped form the decoded MIME body is byte-for-byte the body.

The envelope is ``MAIL FROM:<exit_address>`` ``RCPT TO:<user@host>``; bounces
go to the exit address. Reply codes 4xx, connection failures, timeouts and
disconnects are ``TemporaryFailure``; 5xx is ``PermanentFailure``.

``smtplib`` runs in a worker thread (``trio.to_thread.run_sync``) that is not
abandoned on cancellation: a send that started finishes (bounded by
``timeout``) so its outcome is not lost.
"""

from __future__ import annotations

import base64
import re
import smtplib
import ssl
from dataclasses import dataclass
from email.utils import formatdate
from typing import Literal

import trio

from ..wire.delivery import Destination, ExitMessage
from .handlers import PermanentFailure, TemporaryFailure

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

Form = Literal["verbatim", "wrapped-7bit", "wrapped-base64-text", "wrapped-base64-binary"]


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
    if verbatim and looks_like_message(body):
        return SmtpContent("verbatim", body, any(b > 127 for b in body))
    headers = [
        f"From: {exit_address}",
        f"To: {dest.target}",
        f"Subject: {subject}",
        f"Date: {formatdate(now, usegmt=True)}",
        f"Message-ID: <{msg.message_id.hex()}@{MESSAGE_ID_DOMAIN}>",
        "MIME-Version: 1.0",
    ]
    if smtp_safe(body) and body.isascii():
        form: Form = "wrapped-7bit"
        headers += ["Content-Type: text/plain; charset=us-ascii", "Content-Transfer-Encoding: 7bit"]
        payload = body
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


class SmtpHandler:
    """Delivers ``smtp:`` destinations.

    ``relay=(host, port)`` sends everything through that server; otherwise the
    message goes straight to the destination's ``host:port`` (no MX lookup:
    the DEST names the mail server). ``starttls``: ``"opportunistic"`` (use
    it when offered, without certificate checks), ``"required"`` (verified
    TLS or a temporary failure) or ``"off"``.
    """

    def __init__(
        self,
        *,
        exit_address: str = "hydra-exit@localhost",
        relay: tuple[str, int] | None = None,
        subject: str = "Message via Hydra",
        verbatim: bool = True,
        timeout: float = 60.0,
        starttls: Literal["off", "opportunistic", "required"] = "opportunistic",
        username: str | None = None,
        password: str | None = None,
        helo_name: str | None = None,
    ) -> None:
        if starttls not in ("off", "opportunistic", "required"):
            raise ValueError("starttls must be off, opportunistic or required")
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
        self.helo_name = helo_name

    async def deliver(self, msg: ExitMessage) -> None:
        dest = msg.dest
        if dest.kind != "smtp":
            raise PermanentFailure("wrong_handler", f"smtp handler got {dest.kind}")
        content = render(
            msg, dest, exit_address=self.exit_address, subject=self.subject, verbatim=self.verbatim
        )
        host, port = self.relay or (dest.host or "", dest.port or 25)
        await trio.to_thread.run_sync(self._send, host, port, rcpt_address(dest), content)

    def _tls_context(self, host: str) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        if self.starttls == "opportunistic":
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def _send(self, host: str, port: int, rcpt: str, content: SmtpContent) -> None:
        try:
            with smtplib.SMTP(
                host, port, local_hostname=self.helo_name, timeout=self.timeout
            ) as conn:
                conn.ehlo_or_helo_if_needed()
                if self.starttls != "off" and conn.has_extn("starttls"):
                    conn.starttls(context=self._tls_context(host))
                    conn.ehlo()
                elif self.starttls == "required":
                    raise TemporaryFailure("smtp_no_starttls", "server does not offer STARTTLS")
                if self.username is not None:
                    conn.login(self.username, self.password or "")
                opts = ["BODY=8BITMIME"] if content.eight_bit and conn.has_extn("8bitmime") else []
                conn.sendmail(self.exit_address, [rcpt], content.data, mail_options=opts)
        except (TemporaryFailure, PermanentFailure):
            raise
        except smtplib.SMTPRecipientsRefused as e:
            code, text = next(iter(e.recipients.values()))
            raise _classify(code, text, "RCPT") from None
        except smtplib.SMTPAuthenticationError as e:
            raise TemporaryFailure("smtp_auth_failed", f"relay login: {e.smtp_code}") from None
        except smtplib.SMTPResponseException as e:
            raise _classify(e.smtp_code, e.smtp_error, type(e).__name__) from None
        except smtplib.SMTPServerDisconnected:
            raise TemporaryFailure("smtp_disconnected", f"{host}:{port}") from None
        except TimeoutError:
            raise TemporaryFailure("timeout", f"{host}:{port}") from None
        except ConnectionRefusedError:
            raise TemporaryFailure("connect_refused", f"{host}:{port}") from None
        except smtplib.SMTPException as e:  # (an OSError subclass: must come first)
            raise TemporaryFailure("smtp_error", type(e).__name__) from None
        except (OSError, ssl.SSLError) as e:
            raise TemporaryFailure("connect_failed", f"{host}:{port}: {type(e).__name__}") from None
