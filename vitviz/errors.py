"""The one exception type for mistakes a user can make (bad model source, image, file, argument).

Entry points (the CLI, the training CLI, the app) turn it into one line; a traceback means a bug.
"""

from __future__ import annotations


class VitvizError(Exception):
    """A problem the user caused and can fix; the message says what is wrong and what to do."""
