"""The one error a user's mistake raises, in every package and every command-line tool.

``UsageError``: what the user gave us (a flag's value, a file or folder they named, a card, an
image) cannot be used, and its message names the value and what is allowed. Command-line tools
print exactly these as one line and exit 2 (``model_store.cli.run``); anything else is a bug, or
the machine failing, and keeps its traceback. It is a ``ValueError`` so that code written
against the standard library's meaning ("a bad value") still catches it.
"""


class UsageError(ValueError):
    """The user's input cannot be used; the message says which input, and what would do."""
