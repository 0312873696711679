"""One anti-entropy round as two sans-I/O state machines (frames in, frames out).

The node (``runtime``), the light client and the simulator all drive these;
none of them writes the frame order itself. The round, initiator A and
responder B (frames in ``overlay.wire.sync``)::

    A -> B  Summary
    B -> A  Entries
    A -> B  Want
    B -> A  Records     only when Want named ids
    A -> B  Records     A's push: what B lacks or holds older in the buckets
                        B listed (only when there is any, and A pushes)

A round ends at the push, or, without one, when A closes its side: the
responder learns that from ``end()``. An initiator that keeps the stream for
its next round (``always_push``) sends the push even when it is empty, so the
responder knows the round is over; the responder then waits for the next
``Summary`` on the same stream. Anything out of this order, and a reply
longer than what was asked, is a ``DecodeError`` (``Reason.MALFORMED``): the
caller penalises the peer as for any malformed frame. The machines never
validate records: they hand the raw ones they received (``records``,
``pushed``) to the caller, whose view validates them as it does gossip.

Usage (initiator)::

    r = Initiator(ae, now=clock())
    send(r.start())
    while not r.done:
        for frame in r.receive(recv()):
            send(frame)
    ingest(r.records)

Usage (responder)::

    r = Responder(ae)
    while not r.done:
        frame = recv()              # None at end of stream
        out = r.end() if frame is None else r.receive(frame)
        for f in out:
            send(f)
    ingest(r.pushed)
"""

from __future__ import annotations

from enum import Enum

from ..errors import DecodeError, LocalError, Reason
from ..wire import sync
from .antientropy import AntiEntropy


class Step(Enum):
    START = "start"
    ENTRIES = "entries"  # waiting for this frame
    RECORDS = "records"
    SUMMARY = "summary"
    WANT = "want"
    PUSH = "push"
    DONE = "done"


class RoundAborted(LocalError):
    """The responder's peer closed the stream before the round was over (it gave up:
    its deadline passed, or it is shutting down). Not bad input."""


def _expect(frame: sync.Frame, kind: type):
    if not isinstance(frame, kind):
        raise DecodeError(
            Reason.MALFORMED, f"sync: {type(frame).__name__} where {kind.__name__} belongs"
        )
    return frame


class Initiator:
    """The side that starts a round and pulls (and, with ``push``, pushes).

    ``now``: when given, ``AntiEntropy.want`` skips identities the view's admission
    refused lately. ``push_ae``: whose view the push is computed from (the node
    serves peers it does not know a narrower view); ``push=False`` never pushes
    (the light client); ``always_push`` sends the push even when empty (the end
    of a round on a stream kept for the next one)."""

    def __init__(
        self,
        ae: AntiEntropy,
        *,
        now: float | None = None,
        push: bool = True,
        push_ae: AntiEntropy | None = None,
        always_push: bool = False,
    ) -> None:
        self.ae = ae
        self.push_ae = push_ae or ae
        self.now = now
        self.push = push
        self.always_push = always_push
        self.step = Step.START
        self.entries: sync.Entries | None = None
        self.want: sync.Want | None = None
        self.records: tuple[bytes, ...] = ()  # received, for the caller to ingest
        self.pushed = 0  # records pushed

    @property
    def done(self) -> bool:
        return self.step is Step.DONE

    @property
    def answered(self) -> bool:
        """The peer has answered this round (its ``Entries`` came)."""
        return self.entries is not None

    @property
    def differed(self) -> bool:
        """The views differed: entries came, records were wanted or pushed."""
        return bool(
            (self.entries is not None and self.entries.entries)
            or (self.want is not None and self.want.ids)
            or self.pushed
        )

    def start(self) -> sync.Summary:
        if self.step is not Step.START:
            raise RuntimeError("a round starts once")
        self.step = Step.ENTRIES
        return self.ae.summary()

    def receive(self, frame: sync.Frame) -> list[sync.Frame]:
        """Feed the peer's next frame; returns the frames to send, in order."""
        if self.step is Step.ENTRIES:
            self.entries = _expect(frame, sync.Entries)
            self.want = self.ae.want(self.entries, self.now)
            if self.want.ids:
                self.step = Step.RECORDS
                return [self.want]
            return [self.want, *self._finish()]
        if self.step is Step.RECORDS:
            recs = _expect(frame, sync.Records)
            assert self.want is not None
            if len(recs.records) > len(self.want.ids):
                raise DecodeError(Reason.MALFORMED, "sync: more records than were wanted")
            self.records = recs.records
            return self._finish()
        raise DecodeError(Reason.MALFORMED, f"sync: {type(frame).__name__} after the round")

    def _finish(self) -> list[sync.Frame]:
        self.step = Step.DONE
        if not self.push:
            return []
        assert self.entries is not None
        push = self.push_ae.push_for(self.entries)
        self.pushed = len(push.records)
        return [push] if push.records or self.always_push else []


class Responder:
    """The side that answers a round (and takes the initiator's push)."""

    def __init__(self, ae: AntiEntropy) -> None:
        self.ae = ae
        self.step = Step.SUMMARY
        self.pushed: tuple[bytes, ...] = ()  # the initiator's push, for the caller to ingest

    @property
    def done(self) -> bool:
        return self.step is Step.DONE

    def receive(self, frame: sync.Frame) -> list[sync.Frame]:
        if self.step is Step.SUMMARY:
            summary = _expect(frame, sync.Summary)
            self.step = Step.WANT
            return [self.ae.entries_for(summary)]
        if self.step is Step.WANT:
            want = _expect(frame, sync.Want)
            self.step = Step.PUSH
            return [self.ae.records_for(want)] if want.ids else []
        if self.step is Step.PUSH:
            self.pushed = _expect(frame, sync.Records).records
            self.step = Step.DONE
            return []
        raise DecodeError(Reason.MALFORMED, f"sync: {type(frame).__name__} after the round")

    def end(self) -> list[sync.Frame]:
        """The initiator closed its side. After its want, that is a round without a
        push; earlier, it gave up (``RoundAborted``)."""
        if self.step is Step.PUSH:
            self.step = Step.DONE
            return []
        if self.step is Step.DONE:
            return []
        raise RoundAborted(f"stream closed while waiting for {self.step.value}")
