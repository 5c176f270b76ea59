"""tools/break_tests.py stays runnable: every breakage still finds the code it breaks and names tests
that exist (a refactor that moves the code would otherwise turn a power check into an error row)."""

import re
from pathlib import Path

import pytest

from tools.break_tests import BREAKAGES, ROOT


@pytest.mark.parametrize("breakage", BREAKAGES, ids=lambda b: b.name)
def test_each_breakage_applies_and_names_real_tests(breakage):
    assert breakage.old in (ROOT / breakage.path).read_text(), f"{breakage.path} no longer holds the code to break"
    assert breakage.old != breakage.new
    for test in breakage.tests:
        path, _, name = test.partition("::")
        assert (ROOT / path).exists(), test
        if name:
            function = re.sub(r"\[.*\]$", "", name)
            assert re.search(rf"^def {function}\(", Path(ROOT / path).read_text(), re.M), test
