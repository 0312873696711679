"""How an exit combines other exits' answers before a late or resent delivery."""

from overlay.crypto import SigningKey
from overlay.services.notices import AnswerTally
from overlay.wire.delivered import Answer

A, B, C, D = (SigningKey(bytes([i + 1]) * 32).node_id for i in range(4))
K1, K2 = b"1" * 16, b"2" * 16


def test_a_named_exit_is_believed_alone():
    t = AnswerTally([K1, K2], named={A}, others=3)
    assert not t.add(A, Answer((K1,), ()))
    assert t.add(A, Answer((), (K2,)))  # both keys settled: stop waiting
    assert t.result() == Answer((K1,), (K2,))


def test_one_other_exit_cannot_make_us_drop_or_stall_a_message():
    t = AnswerTally([K1], named={A}, others=3)
    assert not t.add(B, Answer((K1,), ()))  # a liar, asked at random
    assert not t.add(C, Answer((), (K1,)))  # "held" from an exit the sender never used
    assert t.result() == Answer()
    assert t.add(D, Answer((K1,), ()))  # a second exit heard the same notice
    assert t.result() == Answer((K1,), ())


def test_with_a_single_other_exit_its_word_is_enough():
    t = AnswerTally([K1], named=set(), others=1)
    assert t.add(B, Answer((K1,), ()))
    assert t.result().delivered == (K1,)


def test_delivered_wins_over_held_and_unasked_keys_are_ignored():
    t = AnswerTally([K1], named={A, B}, others=0)
    t.add(A, Answer((), (K1,)))
    t.add(B, Answer((K1, K2), ()))
    assert t.result() == Answer((K1,), ())
