"""One exception type for every problem a user can fix.

Boundaries (API, CLI, notebook parameters) raise `SelpruneError` with a message that
names the problem and the fix; the CLI prints it without a traceback.
"""


class SelpruneError(ValueError):
    """A problem with the user's input or environment, with the fix in its message."""
