"""FrameSender: one stream per peer, bounded queues, no stream churn when slow.

Streams here are in-memory stand-ins that record what was written; the real
liveness transport (libp2p streams between real nodes) is covered by
tests/integration/test_resilience.py.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

import trio

from overlay.services.frame_sender import FrameSender


class FakeStream:
    def __init__(self, opener: Opener, write_delay: float = 0.0) -> None:
        self.opener = opener
        self.written: list[bytes] = []
        self.write_delay = write_delay
        self.reset_called = False
        self.closed = False

    async def write(self, data: bytes) -> None:
        if self.write_delay:
            await trio.sleep(self.write_delay)
        if self.opener.fail_writes:
            self.opener.fail_writes -= 1
            raise OSError("broken")
        self.written.append(data)

    async def reset(self) -> None:
        self.reset_called = True

    async def close(self) -> None:
        self.closed = True


class Opener:
    def __init__(
        self, delay: float = 0.0, fail: int = 0, fail_writes: int = 0, write_delay: float = 0.0
    ) -> None:
        self.delay = delay
        self.fail = fail  # opens that fail
        self.fail_writes = fail_writes  # writes that fail, whatever the stream
        self.write_delay = write_delay
        self.opened: list[FakeStream] = []
        self.attempts = 0

    async def __call__(self, peer) -> FakeStream:
        self.attempts += 1
        await trio.sleep(self.delay)
        if self.fail:
            self.fail -= 1
            raise OSError("unreachable")
        s = FakeStream(self, self.write_delay)
        self.opened.append(s)
        return s


@asynccontextmanager
async def running(opener: Opener, drops: list, **kw):
    """A FrameSender whose per-peer tasks run until the block ends."""
    s = FrameSender(opener, on_drop=drops.append, **kw)
    async with trio.open_nursery() as n:
        s.bind(n)
        yield s
        n.cancel_scope.cancel()


async def test_frames_go_in_order_on_one_stream(autojump_clock):
    opener, drops = Opener(), []
    async with running(opener, drops) as s:
        for i in range(5):
            assert s.send("a", b"%d" % i) is None
        await trio.sleep(0.1)
        for i in range(5, 8):
            assert s.send("a", b"%d" % i) is None
        await trio.sleep(0.1)
    assert opener.attempts == 1
    assert opener.opened[0].written == [b"%d" % i for i in range(8)]
    assert drops == []


async def test_a_slow_open_queues_frames_instead_of_resetting(autojump_clock):
    """Opening takes 1.5 s (a starved process): frames wait on the one open,
    the queue bound drops the excess, and the stream is never reset."""
    opener, drops = Opener(delay=1.5), []
    async with running(opener, drops, queue_size=4, max_age=5.0) as s:
        results = [s.send("a", b"%d" % i) for i in range(6)]
        await trio.sleep(1.0)  # the open is under way: the queue fills again
        results += [s.send("a", b"%d" % i) for i in range(6, 12)]
        await trio.sleep(2)
    # four queued at once; the task took one off before the second burst
    assert results == [None] * 4 + ["full"] * 2 + [None] + ["full"] * 5
    assert opener.attempts == 1
    (stream,) = opener.opened
    assert stream.written == [b"0", b"1", b"2", b"3", b"6"]
    assert not stream.reset_called
    assert drops == ["full"] * 7


async def test_frames_that_waited_too_long_are_dropped_as_stale(autojump_clock):
    opener, drops = Opener(delay=3.0), []
    async with running(opener, drops, max_age=2.0) as s:
        s.send("a", b"old")  # taken at once, written after the 3 s open
        s.send("a", b"queued")  # waits 3 s in the queue: stale
        await trio.sleep(3.5)
        s.send("a", b"new")
        await trio.sleep(0.1)
    assert opener.opened[0].written == [b"old", b"new"]
    assert drops == ["stale"]


async def test_a_failed_open_backs_off_instead_of_retrying_per_frame(autojump_clock):
    opener, drops = Opener(fail=1), []
    async with running(opener, drops, retry_after=2.0) as s:
        s.send("a", b"1")
        await trio.sleep(0.1)
        assert drops == ["error"]
        assert [s.send("a", b"x") for _ in range(3)] == ["backoff"] * 3
        await trio.sleep(2.0)
        assert s.send("a", b"2") is None
        await trio.sleep(0.1)
    assert opener.attempts == 2  # not one per frame
    assert opener.opened[0].written == [b"2"]


async def test_an_urgent_frame_opens_a_stream_despite_the_back_off(autojump_clock):
    """A probe's ping is not dropped for the back-off after a failed open: that
    would make the probe fail without ever asking the peer."""
    opener, drops = Opener(fail=1), []
    async with running(opener, drops, retry_after=2.0) as s:
        s.send("a", b"1")
        await trio.sleep(0.1)
        assert s.send("a", b"x") == "backoff"
        assert s.send("a", b"ping", urgent=True) is None
        await trio.sleep(0.1)
    assert opener.attempts == 2
    assert opener.opened[0].written == [b"ping"]
    assert drops == ["error", "backoff"]


async def test_a_broken_stream_is_reset_and_the_next_frame_opens_another(autojump_clock):
    opener, drops = Opener(fail_writes=1), []
    async with running(opener, drops) as s:
        s.send("a", b"lost")
        await trio.sleep(0.1)
        s.send("a", b"kept")
        await trio.sleep(0.1)
    first, second = opener.opened
    assert first.reset_called and first.written == []
    assert second.written == [b"kept"]
    assert drops == ["error"]


async def test_a_write_cut_short_resets_the_stream(autojump_clock):
    opener, drops = Opener(write_delay=10.0), []
    async with running(opener, drops, write_timeout=1.0) as s:
        s.send("a", b"1")
        await trio.sleep(2)
    assert opener.opened[0].reset_called  # its framing is unknown after a cut write
    assert drops == ["timeout"]


async def test_a_closed_connection_means_a_new_stream(autojump_clock):
    opener, drops = Opener(), []
    async with running(opener, drops) as s:
        s.send("a", b"1")
        await trio.sleep(0.1)
        s.connection_closed("a")
        s.send("a", b"2")
        await trio.sleep(0.1)
    assert [x.written for x in opener.opened] == [[b"1"], [b"2"]]


async def test_another_connection_closing_keeps_a_stream_that_did_not_run_over_it(autojump_clock):
    """``stream_gone`` tells whether the closed connection carried the stream: a
    second connection (a dial-back) closing keeps it, its own connection's end
    drops it."""
    opener, drops = Opener(), []
    gone: set[int] = set()
    async with running(opener, drops, stream_gone=lambda st: id(st) in gone) as s:
        s.send("a", b"1")
        await trio.sleep(0.1)
        s.connection_closed("a")  # some other connection to "a"
        s.send("a", b"2")
        await trio.sleep(0.1)
        gone.add(id(opener.opened[0]))
        s.connection_closed("a")  # the stream's own
        s.send("a", b"3")
        await trio.sleep(0.1)
    assert [x.written for x in opener.opened] == [[b"1", b"2"], [b"3"]]
    assert opener.opened[0].reset_called and drops == []


async def test_idle_links_end_and_close_their_stream(autojump_clock):
    opener, drops = Opener(), []
    async with running(opener, drops, idle=30.0) as s:
        s.send("a", b"1")
        await trio.sleep(1)
        assert s.links == 1
        await trio.sleep(31)
        assert s.links == 0
        assert opener.opened[0].closed


async def test_the_least_recently_used_idle_link_makes_room(autojump_clock):
    opener, drops = Opener(), []
    async with running(opener, drops, max_links=2) as s:
        for peer in ("a", "b", "a", "c"):  # "b" is then the least recently used
            assert s.send(peer, peer.encode()) is None
            await trio.sleep(0.1)
        assert s.links == 2
        assert s.send("a", b"a2") is None
        await trio.sleep(0.1)
    a, b, c = opener.opened
    assert b.closed and b.written == [b"b"]
    assert a.written == [b"a", b"a", b"a2"] and c.written == [b"c"]
    assert drops == []


async def test_links_and_queues_are_bounded(autojump_clock):
    opener, drops = Opener(delay=100.0), []
    async with running(opener, drops, max_links=3, queue_size=2) as s:
        for peer in range(5):
            for _ in range(5):
                s.send(peer, b"x")
        await trio.sleep(0.1)
        assert s.links == 3
    # 3 peers x 2 queued went in; everything else was refused at once
    assert drops.count("full") == 25 - 6


async def test_unbound_sender_drops():
    drops: list = []
    s = FrameSender(Opener(), on_drop=drops.append)
    assert s.send("a", b"1") == "full"
