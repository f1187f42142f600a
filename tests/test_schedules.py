import pytest

from shared.schedules import Schedule


def test_piecewise_linear_and_flat_outside():
    s = Schedule((100, 200, 400), (10.0, 20.0, 0.0))
    assert [s(0), s(100), s(150), s(200), s(300), s(400), s(10_000)] == pytest.approx([10, 10, 15, 20, 10, 0, 0])
    assert Schedule.constant(3.0)(12345) == 3.0


@pytest.mark.parametrize(("steps", "values"), [((), ()), ((1, 1), (0.0, 1.0)), ((2, 1), (0.0, 1.0)), ((1,), (0.0, 1.0))])
def test_bad_schedules_are_refused(steps, values):
    with pytest.raises(ValueError):
        Schedule(steps, values)
