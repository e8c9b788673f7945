"""The one exception type for mistakes a user can make (bad model source, image, file, argument).

Entry points (the CLI, the training CLI, the app) turn it into one line; a traceback means a bug.
"""

from __future__ import annotations

import os


class VitvizError(Exception):
    """A problem the user caused and can fix; the message says what is wrong and what to do."""


def quoted(name: object) -> str:
    """A file name (or any user-given text) as it may appear inside a one-line message: in single quotes, with
    every character that would break or disguise the line escaped as Python writes it (a newline as \\n, a
    right-to-left override as \\u202e, an undecodable byte as \\udcff, a quote as \\')."""
    text = os.fspath(name) if isinstance(name, os.PathLike) else name
    if isinstance(text, bytes):
        text = text.decode("utf-8", "surrogateescape")
    return "'" + "".join(_escaped(char) for char in str(text)) + "'"


def one_line(text: str) -> str:
    """`text` with every non-printable character escaped, so that it prints as exactly one line."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def _escaped(char: str) -> str:
    if char in "'\\":
        return "\\" + char
    return char if char.isprintable() else repr(char)[1:-1]


def shown(name: object) -> str:
    """A file name as a message shows it: bare when it is plain printable text, else `quoted`."""
    text = quoted(name)
    bare = text[1:-1]
    plain = bare == (os.fspath(name) if isinstance(name, os.PathLike) else str(name))
    return bare if plain and bare == bare.strip() and " " not in bare else text
