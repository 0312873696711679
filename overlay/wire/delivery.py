"""Exit messages: what an exit finds inside a delivered onion payload, and its ack.

Wire format (canonical CBOR map, integer keys):

    exit message (MAX_SIZE 32 KiB)
      0 version      uint (=1)
      1 message id   bstr 16      random, chosen by the sender; the exit de-duplicates on it
      2 destination  tstr 1..512  a DEST: ``smtp:user@host[:port]``, ``maildir:PATH``,
                                  ``http://...`` or ``https://...`` (see ``parse_destination``)
      3 body         bstr 0..MAX_BODY   delivered byte for byte
      4 reply block  bstr 1..1024 optional: an opaque SURB for the acknowledgement
      5 earlier      array of 1..3 bstr 32, optional: node ids of exits the sender
                     handed this message to before (it resends because they did
                     not answer); the exit asks them before delivering, so that a
                     message still held by a slow exit is not delivered twice

    ack (ACK_MAX_SIZE 256 bytes)
      0 version      uint (=1)
      1 message id   bstr 16
      2 status       uint: 0 delivered, 1 queued, 2 rejected
      3 reason       tstr 1..200 printable ASCII, optional (absent when empty)

Invariants:
- ``decode``/``decode_ack`` check the size cap before parsing, accept only the
  canonical encoding (one value, one byte string), reject unknown keys, and
  raise only ``DecodeError`` (``Reason.OVERSIZED``, ``MALFORMED``,
  ``NON_CANONICAL`` or ``UNKNOWN_VERSION``);
- a decoded message's destination always parses (``msg.dest`` never raises);
- ``MAX_BODY`` (30 KiB) is chosen so that the largest message (longest
  destination, largest reply block) still fits the 32 KiB onion class
  (32410-byte messages); the onion layer, not this module, picks the class.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..errors import DecodeError, Reason
from . import cbor

VERSION = 1
MAX_SIZE = 32 * 1024
MAX_BODY = 30 * 1024
MESSAGE_ID_SIZE = 16
MAX_DEST_LEN = 512
MAX_REPLY_BLOCK = 1024
ACK_MAX_SIZE = 256
MAX_REASON_LEN = 200
MAX_EARLIER = 3
NODE_ID_SIZE = 32

K_VERSION, K_ID, K_DEST, K_BODY, K_REPLY, K_EARLIER = 0, 1, 2, 3, 4, 5
A_VERSION, A_ID, A_STATUS, A_REASON = 0, 1, 2, 3
_MSG_REQUIRED = {K_VERSION, K_ID, K_DEST, K_BODY}
_ACK_REQUIRED = {A_VERSION, A_ID, A_STATUS}

DEFAULT_SMTP_PORT = 25


class InvalidDestination(DecodeError):
    """A DEST string that is not one of the accepted forms (always ``Reason.MALFORMED``)."""


# ---- destinations ---------------------------------------------------------------

_LOCAL_RE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}")
_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _check_host(host: str, what: str) -> str:
    """A DNS name (ASCII, LDH labels) or an IP literal; returned lower-cased."""
    if not host or len(host) > 253:
        raise InvalidDestination(detail=f"{what}: bad host")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host.split(".")
    if not all(_LABEL_RE.fullmatch(x) for x in labels) or labels[-1].isdigit():
        raise InvalidDestination(detail=f"{what}: bad host {host[:40]!r}")
    return host.lower()


def _check_port(text: str, what: str) -> int:
    if not text.isdigit() or len(text) > 5 or not 0 < int(text) < 65536:
        raise InvalidDestination(detail=f"{what}: bad port {text[:8]!r}")
    return int(text)


@dataclass(frozen=True, slots=True)
class Destination:
    """A parsed DEST. ``kind`` is one of ``overlay.records.DELIVERY_KINDS``.

    - smtp:    ``target`` = ``user@host``, ``host``/``port`` (port defaults to 25);
    - maildir: ``target`` = ``path`` = the normalised PATH (relative to the exit's
      maildir root, or absolute);
    - http(s): ``target`` = ``url`` = the URL as given; ``host`` (lower-case), ``port``
      (explicit or the scheme default), ``path`` (path and query).
    """

    kind: str
    target: str
    host: str | None = None
    port: int | None = None
    path: str | None = None
    url: str | None = None

    @property
    def policy_subject(self) -> str:
        """What exit-policy rules (``kind:glob``) are matched against.

        smtp: the address ``user@host`` (no port); http/https: the host name;
        maildir: the normalised path.
        """
        if self.kind == "smtp":
            return self.target
        if self.kind in ("http", "https"):
            return self.host or ""
        return self.path or ""

    def __str__(self) -> str:
        if self.kind == "smtp":
            port = "" if self.port == DEFAULT_SMTP_PORT else f":{self.port}"
            return f"smtp:{self.target}{port}"
        if self.kind == "maildir":
            return f"maildir:{self.path}"
        return self.url or ""


def parse_destination(dest: str) -> Destination:
    """Parse a DEST string; raise ``InvalidDestination`` (a ``DecodeError``) if it is not one.

    Accepted forms:
      ``smtp:LOCAL@HOST[:PORT]`` – ASCII dot-atom local part, HOST a DNS name,
      IPv4 or ``[IPv6]``; ``maildir:PATH`` – non-empty, no empty, ``.`` or
      ``..`` segments, no trailing ``/``; ``http://`` or ``https://`` URL with
      a host, no user info, printable ASCII only.
    """
    if type(dest) is not str or not dest:
        raise InvalidDestination(detail="destination must be non-empty text")
    if len(dest) > MAX_DEST_LEN:
        raise InvalidDestination(detail=f"destination longer than {MAX_DEST_LEN}")
    if not dest.isascii() or not dest.isprintable():
        raise InvalidDestination(detail="destination must be printable ASCII")
    if dest.startswith("smtp:"):
        return _parse_smtp(dest[5:])
    if dest.startswith("maildir:"):
        return _parse_maildir(dest[8:])
    if dest.startswith(("http://", "https://")):
        return _parse_url(dest)
    raise InvalidDestination(detail="expected smtp:, maildir:, http:// or https://")


def _parse_smtp(rest: str) -> Destination:
    local, at, hostport = rest.rpartition("@")
    if not at or not _LOCAL_RE.fullmatch(local):
        raise InvalidDestination(detail="smtp: expected user@host[:port]")
    if local.startswith(".") or local.endswith(".") or ".." in local:
        raise InvalidDestination(detail="smtp: bad local part")
    port = DEFAULT_SMTP_PORT
    if hostport.startswith("["):
        host, close, tail = hostport[1:].partition("]")
        if not close:
            raise InvalidDestination(detail="smtp: unclosed [")
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            raise InvalidDestination(detail="smtp: [..] must hold an IPv6 address") from None
        if tail:
            if not tail.startswith(":"):
                raise InvalidDestination(detail="smtp: junk after ]")
            port = _check_port(tail[1:], "smtp")
        shown = f"[{host}]"
    else:
        host, colon, port_s = hostport.partition(":")
        if colon:
            port = _check_port(port_s, "smtp")
        host = _check_host(host, "smtp")
        if ":" in host:  # IPv6 must be bracketed
            raise InvalidDestination(detail="smtp: bracket IPv6 hosts")
        shown = host
    return Destination("smtp", f"{local}@{shown}", host=host, port=port)


def _parse_maildir(path: str) -> Destination:
    if not path:
        raise InvalidDestination(detail="maildir: empty path")
    segments = path[1:].split("/") if path.startswith("/") else path.split("/")
    if any(s in ("", ".", "..") for s in segments):
        raise InvalidDestination(detail="maildir: path has empty, '.' or '..' segments")
    return Destination("maildir", path, path=path)


def _parse_url(url: str) -> Destination:
    if any(c in url for c in " \\"):
        raise InvalidDestination(detail="url: spaces or backslashes")
    try:
        parts = urlsplit(url)
        port = parts.port
        hostname = parts.hostname
    except ValueError:
        raise InvalidDestination(detail="url: cannot parse") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidDestination(detail="url: scheme must be http or https")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise InvalidDestination(detail="url: user info is not supported")
    if not hostname:
        raise InvalidDestination(detail="url: no host")
    if parts.netloc.startswith("["):
        try:
            host = str(ipaddress.IPv6Address(hostname))
        except ValueError:
            raise InvalidDestination(detail="url: bad IPv6 literal") from None
    else:
        host = _check_host(hostname, "url")
        if ":" in host:
            raise InvalidDestination(detail="url: bracket IPv6 hosts")
    if port is None:
        if parts.netloc.endswith(":"):
            raise InvalidDestination(detail="url: empty port")
        port = 443 if parts.scheme == "https" else 80
    elif port == 0:
        raise InvalidDestination(detail="url: port 0")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Destination(parts.scheme, url, host=host, port=port, path=path, url=url)


# ---- exit message ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExitMessage:
    """A message for an exit to deliver. Construct with ``make`` or ``decode``."""

    message_id: bytes
    destination: str
    body: bytes
    reply_block: bytes | None = None
    earlier: tuple[bytes, ...] = ()  # raw node ids of exits that had it before
    version: int = VERSION

    @classmethod
    def make(
        cls,
        message_id: bytes,
        destination: str | Destination,
        body: bytes,
        reply_block: bytes | None = None,
        earlier: tuple[bytes, ...] = (),
    ) -> ExitMessage:
        """Build a message; raise ``DecodeError`` if it would not decode (too long, bad
        DEST, more than ``MAX_EARLIER`` earlier exits)."""
        reply = bytes(reply_block) if reply_block else None
        before = tuple(dict.fromkeys(bytes(n) for n in earlier))
        msg = cls(bytes(message_id), str(destination), bytes(body), reply, before)
        return decode(msg.encode())

    @property
    def dest(self) -> Destination:
        return parse_destination(self.destination)

    @property
    def id_hex(self) -> str:
        return self.message_id.hex()

    def encode(self) -> bytes:
        m: dict = {
            K_VERSION: self.version,
            K_ID: self.message_id,
            K_DEST: self.destination,
            K_BODY: self.body,
        }
        if self.reply_block is not None:
            m[K_REPLY] = self.reply_block
        if self.earlier:
            m[K_EARLIER] = list(self.earlier)
        return cbor.dumps(m)


def encode(msg: ExitMessage) -> bytes:
    return msg.encode()


def decode(data: bytes) -> ExitMessage:
    """Parse an exit message; raise ``DecodeError`` unless ``data`` is canonical and valid."""
    raw = cbor.loads_versioned(data, MAX_SIZE, VERSION, "exit message")
    cbor.expect_map(raw, _MSG_REQUIRED, {K_REPLY, K_EARLIER})
    mid = cbor.bstr(raw[K_ID], "message id", MESSAGE_ID_SIZE)
    dest = cbor.tstr(raw[K_DEST], "destination", MAX_DEST_LEN)
    parse_destination(dest)
    body = cbor.bstr(raw[K_BODY], "body", max_size=MAX_BODY)
    reply = None
    if K_REPLY in raw:
        reply = cbor.bstr(raw[K_REPLY], "reply block", max_size=MAX_REPLY_BLOCK)
        if not reply:
            raise DecodeError(Reason.MALFORMED, "empty reply block (omit the key)")
    earlier: tuple[bytes, ...] = ()
    if K_EARLIER in raw:
        ids = cbor.array(raw[K_EARLIER], "earlier exits", MAX_EARLIER)
        earlier = tuple(cbor.bstr(n, "earlier exit", NODE_ID_SIZE) for n in ids)
        if not earlier or len(set(earlier)) != len(earlier):
            raise DecodeError(Reason.MALFORMED, "earlier exits: empty or repeated (omit the key)")
    return ExitMessage(mid, dest, body, reply, earlier)


# ---- acknowledgement ------------------------------------------------------------


class AckStatus(enum.IntEnum):
    DELIVERED = 0  # handed to the destination (SMTP server accepted, file written, 2xx)
    QUEUED = 1  # accepted durably; delivery pending (retrying)
    REJECTED = 2  # will never be delivered by this exit; ``reason`` says why


@dataclass(frozen=True, slots=True)
class Ack:
    message_id: bytes
    status: AckStatus
    reason: str = ""
    version: int = VERSION

    @classmethod
    def make(cls, message_id: bytes, status: AckStatus, reason: str = "") -> Ack:
        """Build an ack; ``reason`` is cut to ``MAX_REASON_LEN`` printable ASCII characters."""
        clean = "".join(c if c.isascii() and c.isprintable() else "?" for c in reason)
        clean = clean[:MAX_REASON_LEN]
        return cls(bytes(message_id), AckStatus(status), clean)

    def encode(self) -> bytes:
        m: dict = {A_VERSION: self.version, A_ID: self.message_id, A_STATUS: int(self.status)}
        if self.reason:
            m[A_REASON] = self.reason
        return cbor.dumps(m)


def encode_ack(ack: Ack) -> bytes:
    return ack.encode()


def decode_ack(data: bytes) -> Ack:
    """Parse an ack; raise ``DecodeError`` unless ``data`` is canonical and valid."""
    raw = cbor.loads_versioned(data, ACK_MAX_SIZE, VERSION, "ack")
    cbor.expect_map(raw, _ACK_REQUIRED, {A_REASON})
    mid = cbor.bstr(raw[A_ID], "message id", MESSAGE_ID_SIZE)
    status = raw[A_STATUS]
    if type(status) is not int or status not in (0, 1, 2):
        raise DecodeError(Reason.MALFORMED, "unknown ack status")
    reason = ""
    if A_REASON in raw:
        reason = cbor.tstr(raw[A_REASON], "reason", MAX_REASON_LEN)
        if not reason or not reason.isascii() or not reason.isprintable():
            raise DecodeError(Reason.MALFORMED, "reason must be non-empty printable ASCII")
    return Ack(mid, AckStatus(status), reason)
