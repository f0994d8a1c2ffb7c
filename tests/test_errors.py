import pytest

from pipeline.errors import UserError, first_line


def test_first_line_takes_a_library_messages_first_line_within_the_limit():
    assert first_line(OSError("  disk full\nTraceback (most recent call last):\n  ...")) == "disk full"
    assert first_line(KeyError()) == "KeyError"  # no text: the error's kind
    assert first_line("x" * 300) == "x" * 200 and first_line("abcdef", limit=3) == "abc"


def test_a_user_error_is_a_value_error_that_keeps_its_message():
    with pytest.raises(ValueError, match=r"^--params p.yaml: no such file$"):
        raise UserError("--params p.yaml: no such file")
