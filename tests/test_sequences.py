import numpy as np

from attnrec.export.data.sequences import build_sequences, leave_one_out
from tests.conftest import make_log

ROWS = [  # user, item, time — deliberately out of order
    ("b", 30, 5),
    ("a", 10, 3),
    ("a", 20, 1),
    ("a", 30, 2),
    ("b", 10, 1),
    ("a", 40, 4),
    ("c", 20, 1),
    ("c", 10, 2),
    ("b", 20, 3),
    ("b", 40, 4),
]


def test_id_maps_are_deterministic_and_sorted():
    data = build_sequences(make_log(ROWS))
    assert data.user_ids.tolist() == ["a", "b", "c"]
    assert data.item_ids.tolist() == [0, 10, 20, 30, 40]  # 0 = padding
    shuffled = build_sequences(make_log(ROWS[::-1]))
    assert shuffled.item_ids.tolist() == data.item_ids.tolist()
    assert shuffled.items.tolist() == data.items.tolist()


def test_sequences_are_in_time_order_with_ties_in_file_order():
    data = build_sequences(make_log(ROWS + [("c", 30, 2)]))
    ext = lambda u: data.item_ids[data.sequence(u)].tolist()  # noqa: E731
    assert ext(0) == [20, 30, 10, 40]
    assert ext(1) == [10, 20, 40, 30]
    assert ext(2) == [20, 10, 30]  # (c,10,2) came before (c,30,2) in the file


def test_leave_one_out_targets_histories_and_training_prefix():
    split = leave_one_out(build_sequences(make_log(ROWS)))
    data = split.data
    tok = lambda *ext: [data.item_ids.tolist().index(e) for e in ext]  # noqa: E731
    # user a: 20 30 10 40 → train [20 30], valid target 10, test target 40
    assert split.train_sequence(0).tolist() == tok(20, 30)
    assert split.valid.targets[0] == tok(10)[0] and split.valid.history(0).tolist() == tok(20, 30)
    assert split.test.targets[0] == tok(40)[0] and split.test.history(0).tolist() == tok(20, 30, 10)
    # user c has 2 interactions: training only, never evaluated
    assert split.n_train_only == 1
    assert split.test.users.tolist() == [0, 1]
    assert split.train_sequence(2).tolist() == tok(20, 10)
    # training popularity counts only training prefixes: a[20,30], b[10,20], c[20,10]
    pop = split.train_popularity()
    assert pop.tolist() == [0, 2, 3, 1, 0]


def test_item_vocab_keeps_a_models_numbering_and_drops_unknown_items(caplog):
    vocab = np.array([40, 30, 20, 10])  # a model's catalogue, in its own row order
    data = build_sequences(make_log(ROWS + [("a", 99, 9)]), item_vocab=vocab)
    assert data.item_ids[1:].tolist() == [40, 30, 20, 10]
    assert data.item_ids[data.sequence(0)].tolist() == [20, 30, 10, 40]
    assert "1 interactions with 1 items unknown" in caplog.text
