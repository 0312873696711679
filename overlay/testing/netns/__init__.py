"""Network-namespace test lab: test hosts with two "feed" links to two providers.

Used by ``tests/netns`` (pytest fixtures ``make_lab`` / ``lab``) and by
``scripts/netns-lab`` for manual experiments.  Pure stdlib; everything is done
by running ``ip`` (iproute2) as root.  Nothing here touches the real network:
every link created is a veth pair whose two ends live in namespaces created by
the lab, no namespace has a link to the root namespace, and no namespace has a
default route.

Topology (``Lab(hosts=N, providers=K)``)::

                          core  (router)
               provA ---/      \\--- provB       (routers, "two ISPs")
              /  |  \\             /  |  \\
            h1  h2  h3          h1  h2  h3       (each host: one link to each provider)

Namespaces are named ``{prefix}core``, ``{prefix}provA``, ``{prefix}provB``,
``{prefix}h1`` ...; the default prefix is ``hy{pid}x{n}-`` (owner pid + per-process
counter), so parallel runs never collide and leftovers of crashed runs can be
recognised (owner pid dead) and removed with :func:`cleanup_stale`.

Addressing (provider k = 0, 1, ... is named "A", "B", ...; host i = 1, 2, ...):

* provider k owns ``10.(11+k).0.0/16``; host i's link to it is the subnet
  ``10.(11+k).i.0/24`` with the provider at ``.1`` and the host at ``.2``.
  So h2's addresses are ``10.11.2.2`` (A, device ``ethA``) and ``10.12.2.2``
  (B, device ``ethB``).
* core <-> provider k transit: ``10.10.(k+1).0/24``, core ``.1``, provider ``.2``.

Interface names (per namespace, so no global clash, all <= 15 chars): host side
``eth{P}``; provider side ``h{i}`` (to host i) and ``core``; core side ``prov{P}``.

Routing (plain destination routing, no policy routing):

* host: ``10.(11+k).0.0/16 via <provider k> metric 10`` for every provider
  ("on-net": traffic to a provider's addresses leaves through the link to that
  provider, with that link's address as source), plus a fallback
  ``10.0.0.0/8 via <provider k> metric 100+k`` for every provider, so when one
  of the host's own links is cut its traffic goes out through another provider
  (and core).  No default route: anything outside 10/8 is unreachable.
  Hosts do not forward.
* provider k: connected /24s to its hosts, ``unreachable 10.(11+k).0.0/16`` (so a
  cut host link answers with ICMP unreachable at once instead of looping) and
  ``10.0.0.0/8 via core``.  ip_forward=1.
* core: ``10.(11+k).0.0/16 via provider k``.  ip_forward=1.
* everywhere: ``ignore_routes_with_linkdown=1`` (a link whose peer is down is not
  used) and ``rp_filter=0``; loopback is up.

Cutting a feed: :meth:`Lab.cut` sets the link down on the host side (default,
the host sees its interface go down) or on the provider side (the host only
sees NO-CARRIER, like a cut upstream).  Either way the host's address on that
provider becomes unreachable from everywhere while its other addresses stay
reachable.  :meth:`Lab.restore` brings both ends up and re-installs the host's
routes (the kernel drops routes through an interface that goes down).

Cleanup is guaranteed by: ``with Lab(...)`` (``__exit__`` and a failed
``__enter__`` both call :meth:`Lab.close`), an ``atexit`` hook that closes
every open lab, a SIGTERM/SIGHUP handler (installed only while labs are open
and only if the signal would otherwise kill the process without running
``atexit``) and, for SIGKILL/power loss, :func:`cleanup_stale` which removes
namespaces whose owner pid is dead and that are older than a minute (the pytest
fixture calls it once per session, ``scripts/netns-lab up`` on start).  :meth:`Lab.close` kills processes started with :meth:`Lab.popen`,
then every process still inside a lab namespace, then deletes the namespaces
(which destroys all the veths, since every veth end lives in a lab namespace).

From trio tests: the methods block for a few milliseconds (they run ``ip``);
wrap them in ``trio.to_thread.run_sync`` if that matters.  To run a node under
trio use ``trio.open_process(lab.exec_argv(host, argv))``; such processes are not
tracked by :meth:`Lab.popen` but are still killed at teardown, because
:meth:`Lab.close` kills every process left inside the lab's namespaces.
"""

from .ip import LabError, cleanup_stale, list_namespaces, netns_available
from .lab import Host, Lab, Provider

__all__ = [
    "Host",
    "Lab",
    "LabError",
    "Provider",
    "cleanup_stale",
    "list_namespaces",
    "netns_available",
]
