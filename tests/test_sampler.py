"""The fine-tuning stages' data order: every index once per epoch, a new order each epoch, and a
restored state draws exactly what the uninterrupted order would have drawn."""

from lmforge.train.sampler import EpochOrder, rank_slice


def test_each_epoch_is_a_permutation_and_resume_continues_exactly():
    order = EpochOrder(7, seed=3)
    drawn = order.take(5) + order.take(9)  # two epochs
    assert sorted(drawn[:7]) == list(range(7)) and sorted(drawn[7:14]) == list(range(7))
    assert drawn[:7] != drawn[7:14]
    resumed = EpochOrder(7, seed=3)
    resumed.take(5)
    state = resumed.state_dict()
    fresh = EpochOrder(7, seed=3)
    fresh.load_state_dict(state)
    assert fresh.take(9) == drawn[5:]
    assert EpochOrder(7, seed=4).take(7) != drawn[:7]


def test_rank_slice_splits_a_global_batch():
    assert rank_slice([0, 1, 2, 3, 4, 5], rank=1, per_rank=2) == [2, 3]
