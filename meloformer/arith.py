"""Integer arithmetic shared by the masks and the model."""


def ceil_div(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ``b``, exact for any integer size (no float rounding)."""
    return -(-a // b)
