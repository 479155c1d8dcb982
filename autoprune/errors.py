"""User-facing errors: one line that names the problem and the fix.

Library code raises :class:`AutopruneError` for bad input; the CLI prints its
message without a traceback and exits with :attr:`exit_code` (2 by default).
"""


class AutopruneError(Exception):
    """Bad input or an unusable resource, described in one line."""

    exit_code = 2


class NothingQualifies(AutopruneError):
    """A query (pick, export --pick) found no trial that meets its constraints."""

    exit_code = 1
