"""fastrms.bench.cold: cold starts in fresh processes, with Numba's own floor beside them."""

import io

import pytest

from fastrms.bench import cold


@pytest.mark.slow
def test_cold_starts_are_measured_against_the_bare_import_and_numbas_floor():
    r = cold.measure(rounds=1, torch=False, shells=False)
    cases = r["cases"]
    assert "first fastrms.torch step" not in cases and r["first compile"] == {}
    base = cases["import numba, numpy"]["wall"]
    floor = cases["Numba's floor: import + one cached @njit call"]
    assert base > 0 and floor["first call"] > 0
    # each process did what it says: the fastrms cases import numba and numpy and more
    assert cases["import fastrms + first dense step"]["wall"] > base / 2
    assert 0 < cases["first step_rows"]["first step"] < cases["first step_rows"]["wall"]
    out = io.StringIO()
    cold.report(r, file=out)
    text = out.getvalue()
    assert "x import numba, numpy" in text and "floor" in text


def test_a_failing_cold_process_is_an_error_naming_its_last_line():
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        cold._run("1 / 0", env=None)
