"""The record seq never goes backwards: lost, corrupt or rolled-back ``state.json``."""

import json
import logging
import time

import pytest

from overlay.errors import LocalError
from overlay.home import Home, time_floor
from overlay.testing import make_home as _make_home


def make_home(path):
    return _make_home(path, listen=["/ip4/127.0.0.1/tcp/4555"])


CORRUPT = {
    "garbage": b"\x00\x01garbage",
    "non-utf8": b'{"seq": \xff\xfe 5}',
    "truncated": b'{"seq": 4',
    "not an object": b"[5]",
    "no seq": b'{"sequence": 5}',
    "negative": b'{"seq": -1}',
    "float": b'{"seq": 5.0}',
    "bool": b'{"seq": true}',
    "string": b'{"seq": "5"}',
    "beyond uint64": b'{"seq": 18446744073709551616}',
    "deep": b"[" * 100_000,
    "huge": b'{"seq": 5, "pad": "' + b"x" * 10_000 + b'"}',
    "empty": b"",
}


def test_seq_counts_up_from_init(tmp_path):
    home = make_home(tmp_path / "h")
    assert [home.next_seq() for _ in range(3)] == [1, 2, 3]
    assert home.last_seq() == 3
    assert json.loads(home.state_path.read_text()) == {"seq": 3}


@pytest.mark.parametrize("content", CORRUPT.values(), ids=CORRUPT.keys())
def test_corrupt_state_restarts_above_everything_published(tmp_path, caplog, content):
    home = make_home(tmp_path / "h")
    published = [home.make_record().seq for _ in range(3)]
    home.state_path.write_bytes(content)
    before = time_floor()
    with caplog.at_level(logging.WARNING, logger="hydra.home"):
        seq = home.make_record().seq
        after = home.next_seq()  # the file was repaired: no second warning
    assert seq > max(published) and seq > before
    assert after == seq + 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "corrupt" in warnings[0].getMessage()
    assert json.loads(home.state_path.read_text()) == {"seq": after}


def test_lost_state_restarts_from_time_floor(tmp_path, caplog):
    home = make_home(tmp_path / "h")
    home.next_seq()
    home.state_path.unlink()
    with caplog.at_level(logging.WARNING, logger="hydra.home"):
        seq = home.next_seq()
    assert seq > time_floor(time.time() - 60)
    assert "missing" in caplog.text


def test_time_floor_is_ahead_of_a_previous_floor_plus_a_day_of_records(tmp_path):
    """A node that lost its state once and then published one record a second for a day
    is still behind the floor taken a day later: the floor grows 1,000 per second."""
    home = make_home(tmp_path / "h")
    home.state_path.unlink()
    first = home.next_seq(above=0)
    for _ in range(3):
        home.next_seq()
    day_later = time_floor(time.time() + 86_400)
    assert first + 86_400 < day_later


def test_rolled_back_state_goes_above_the_seq_the_caller_holds(tmp_path):
    home = make_home(tmp_path / "h")
    for _ in range(50):
        home.next_seq()
    home.state_path.write_text(json.dumps({"seq": 7}))  # an old backup, valid JSON
    assert home.next_seq(above=50) == 51
    assert home.make_record(above=60).seq == 61
    assert home.make_tombstone(above=70).seq == 71
    assert home.next_seq() == 72


def test_unwritable_state_is_a_local_error(tmp_path):
    home = make_home(tmp_path / "h")
    home.state_path.unlink()
    home.state_path.mkdir()  # os.replace onto a directory fails
    with pytest.raises(LocalError, match="cannot write"):
        home.next_seq()


def test_seq_space_exhausted_is_a_local_error(tmp_path):
    home = Home(tmp_path / "h")
    home.path.mkdir()
    home.state_path.write_text(json.dumps({"seq": 2**64 - 1}))
    with pytest.raises(LocalError, match="exhausted"):
        home.next_seq()
