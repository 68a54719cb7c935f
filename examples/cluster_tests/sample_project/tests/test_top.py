import pytest
from textstats import top


def test_most_frequent_first():
    assert top("b a b c b a", 2) == [("b", 3), ("a", 2)]


def test_ties_in_alphabetical_order():
    assert top("pear apple fig", 3) == [("apple", 1), ("fig", 1), ("pear", 1)]


def test_asking_for_more_than_there_is_gives_all():
    assert top("one two", 10) == [("one", 1), ("two", 1)]


def test_a_negative_count_is_refused():
    with pytest.raises(ValueError, match="n must be 0 or more"):
        top("words", -1)
