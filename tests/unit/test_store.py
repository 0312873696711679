import threading

import pytest

from overlay.crypto import SigningKey
from overlay.errors import LocalError
from overlay.records import Role, decode, make_tombstone
from overlay.storage.records import RecordStore
from tests.recgen import KEY, NOW, exit_record, relay_record


def test_newest_wins_and_survives_restart(tmp_path):
    db = tmp_path / "r.db"
    with RecordStore(db) as st:
        assert st.put(exit_record(seq=2))
        assert not st.put(exit_record(seq=1))
        assert not st.put(exit_record(seq=2))
        assert st.put(exit_record(seq=3))
    with RecordStore(db) as st:
        rec = st.get(KEY.node_id, NOW)
        assert rec.seq == 3
        assert [r.seq for r in st.by_role(Role.EXIT, NOW)] == [3]
        assert st.by_role(Role.ENTRY, NOW) == []
        assert st.digest() == [(bytes(KEY.node_id), 3)]


def test_seq_ordering_uses_full_uint64(tmp_path):
    with RecordStore(tmp_path / "r.db") as st:
        assert st.put(exit_record(seq=5))
        assert st.put(exit_record(seq=2**64 - 1))
        assert not st.put(exit_record(seq=2**63))
        assert st.get(KEY.node_id, NOW).seq == 2**64 - 1


def test_only_valid_records(tmp_path):
    with RecordStore(tmp_path / "r.db") as st:
        with pytest.raises(LocalError):
            st.put(decode(exit_record().encode()))  # unverified


def test_tombstone_and_expiry(tmp_path):
    with RecordStore(tmp_path / "r.db") as st:
        st.put(exit_record(seq=1))
        st.put(make_tombstone(KEY, seq=2, now=NOW))
        assert st.by_role(Role.EXIT, NOW) == []
        assert not st.put(exit_record(seq=2))
        assert st.get(KEY.node_id, NOW).is_tombstone
        r = relay_record()
        st.put(r)
        assert st.purge_expired(r.expires_at) == 1  # the relay; the tombstone lives longer
        assert st.count() == 1


def test_tampered_file_yields_nothing_invalid(tmp_path):
    db = tmp_path / "r.db"
    with RecordStore(db) as st:
        st.put(exit_record(seq=1))
        (raw,) = st._db.execute("SELECT raw FROM records").fetchone()
        bad = raw[:50] + bytes([raw[50] ^ 1]) + raw[51:]
        st._db.execute("UPDATE records SET raw = ?", (bad,))
        assert st.get(KEY.node_id, NOW) is None
        st._db.execute("UPDATE records SET raw = 'text, not a record'")
        assert st.get(KEY.node_id, NOW) is None
        assert st.all(NOW) == []


def test_concurrent_writers(tmp_path):
    db = tmp_path / "r.db"
    key = SigningKey.generate()
    recs = [exit_record(seq=s, key=key) for s in range(1, 41)]
    stores = [RecordStore(db), RecordStore(db)]  # two connections, like two processes

    def writer(st, items):
        for r in items:
            st.put(r)

    threads = [
        threading.Thread(target=writer, args=(stores[0], recs[::2])),
        threading.Thread(target=writer, args=(stores[1], list(reversed(recs)))),
        threading.Thread(target=writer, args=(stores[0], recs[1::2])),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stores[1].get(key.node_id, NOW).seq == 40
    for st in stores:
        st.close()
