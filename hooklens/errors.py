"""Exception types shared across hooklens."""


class InvalidInputError(ValueError, AssertionError):
    """Bad input that TransformerLens 3.9 rejects with an `assert`.

    It is a `ValueError` (what the input is) and an `AssertionError` (what code written against TL catches), and
    its message keeps TL's key words and adds how to fix the input."""
