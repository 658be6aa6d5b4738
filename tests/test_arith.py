"""ceil_div against exact rational ceilings, over many sizes."""

import math
from fractions import Fraction

from meloformer.arith import ceil_div


def test_ceil_div_is_the_exact_ceiling():
    for a in range(-50, 400):
        for b in range(1, 70):
            assert ceil_div(a, b) == math.ceil(Fraction(a, b)), (a, b)
    big = 10**30 + 1  # beyond float precision: a float ceil would round
    assert ceil_div(big, 10**15) == 10**15 + 1
    assert ceil_div(2**60, 2**3) == 2**57
