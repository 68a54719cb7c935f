import pytest
from textstats import reading_minutes


@pytest.mark.parametrize(
    ("count", "minutes"),
    [(0, 0), (1, 1), (200, 1), (201, 2), (1000, 5)],
)
def test_minutes_are_rounded_up(count, minutes):
    assert reading_minutes("word " * count) == minutes


def test_a_faster_reader_needs_less_time():
    assert reading_minutes("word " * 600, per_minute=300) == 2


def test_a_reading_speed_of_zero_is_refused():
    with pytest.raises(ValueError, match="per_minute must be positive"):
        reading_minutes("word", per_minute=0)
