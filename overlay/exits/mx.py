"""Where mail for a domain goes: MX lookup with dnspython (RFC 5321 §5.1, RFC 7505).

``MxResolver.mail_hosts(domain)`` returns the hosts to try, in order, each
with its addresses:

- the domain's MX records, lowest preference first (hosts of equal
  preference in random order, as §5.1 asks, to spread the load);
- no MX record (the name exists): the domain itself, its A/AAAA addresses
  (the "implicit MX" of §5.1);
- a null MX (a single ``0 .``, RFC 7505) or a name that does not exist:
  ``PermanentFailure`` (``null_mx``, ``no_such_domain``); a domain with
  neither MX nor address: ``PermanentFailure("no_mail_host")``;
- any DNS error (timeout, SERVFAIL, no reachable name server):
  ``TemporaryFailure("dns_error")``: the queue tries again later.

An MX host whose own address lookup fails is skipped (the next one may
work); if every host is skipped for DNS errors the failure is temporary.
IPv4 addresses come before IPv6 ones for each host. At most ``MAX_HOSTS``
hosts and ``MAX_ADDRESSES`` addresses per host are used.

Blocking (dnspython's synchronous resolver): call it from a worker thread,
as ``SmtpHandler`` does.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Sequence
from dataclasses import dataclass

import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

from .handlers import PermanentFailure, TemporaryFailure

MAX_HOSTS = 10
MAX_ADDRESSES = 4


@dataclass(frozen=True, slots=True)
class MailHost:
    """One host to try: its name (for TLS and logs) and its addresses."""

    name: str
    preference: int
    addresses: tuple[str, ...]


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class MxResolver:
    """MX and address lookups. ``nameservers``: ``[(ip, port), ...]`` to ask instead
    of the system's (``/etc/resolv.conf``); ``timeout``: seconds per lookup."""

    def __init__(
        self,
        nameservers: Sequence[tuple[str, int]] = (),
        *,
        timeout: float = 10.0,
        rng: random.Random | None = None,
    ) -> None:
        self.nameservers = tuple(nameservers)
        self.timeout = timeout
        self.rng = rng or random.SystemRandom()

    def _resolver(self) -> dns.resolver.Resolver:
        if not self.nameservers:
            try:
                r = dns.resolver.Resolver()
            except dns.exception.DNSException as e:  # no usable resolv.conf
                raise TemporaryFailure("dns_error", f"no name server: {type(e).__name__}") from None
        else:
            r = dns.resolver.Resolver(configure=False)
            r.nameservers = [ip for ip, _ in self.nameservers]
            r.port = self.nameservers[0][1]
        r.lifetime = self.timeout
        r.timeout = self.timeout
        return r

    def mail_hosts(self, domain: str) -> list[MailHost]:
        """The hosts to hand mail for ``domain`` to, in order (see the module docstring)."""
        domain = domain.rstrip(".").lower()
        resolver = self._resolver()
        try:
            answer = resolver.resolve(domain, dns.rdatatype.MX, search=False)
            mx = [(int(r.preference), r.exchange) for r in answer]
        except dns.resolver.NXDOMAIN:
            raise PermanentFailure("no_such_domain", f"{domain} does not exist") from None
        except dns.resolver.NoAnswer:
            mx = []
        except (dns.exception.DNSException, OSError) as e:
            raise TemporaryFailure("dns_error", f"MX {domain}: {type(e).__name__}") from None
        if len(mx) == 1 and mx[0][1] == dns.name.root:
            raise PermanentFailure("null_mx", f"{domain} accepts no mail (null MX)")
        mx = [(p, n) for p, n in mx if n != dns.name.root]
        if not mx:  # implicit MX: the domain itself
            candidates = [(0, domain)]
        else:
            self.rng.shuffle(mx)
            mx.sort(key=lambda pn: pn[0])  # stable: equal preferences stay shuffled
            candidates = [(p, n.to_text(omit_final_dot=True).lower()) for p, n in mx]
        hosts: list[MailHost] = []
        dns_errors = 0
        for pref, name in candidates[:MAX_HOSTS]:
            try:
                addrs = self.addresses(resolver, name)
            except TemporaryFailure:
                dns_errors += 1
                continue
            if addrs:
                hosts.append(MailHost(name, pref, addrs))
        if hosts:
            return hosts
        if dns_errors:
            raise TemporaryFailure("dns_error", f"no address for the mail hosts of {domain}")
        raise PermanentFailure("no_mail_host", f"{domain} has no mail host with an address")

    def addresses(self, resolver: dns.resolver.Resolver, name: str) -> tuple[str, ...]:
        """A then AAAA addresses of ``name`` (at most ``MAX_ADDRESSES``); an IP literal
        is its own address. ``TemporaryFailure`` on DNS errors."""
        if is_ip_literal(name):
            return (name,)
        out: list[str] = []
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            try:
                out += [r.address for r in resolver.resolve(name, rdtype, search=False)]
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            except (dns.exception.DNSException, OSError) as e:
                raise TemporaryFailure("dns_error", f"{name}: {type(e).__name__}") from None
        return tuple(dict.fromkeys(out))[:MAX_ADDRESSES]
