"""The errors a command reports as one `arv-wrap:` line and exit status 2.

Here rather than beside the code that raises them, so that the command line can
catch them without importing that code (a run's start does not load the YAML
parser of arvwrap.whitelist unless its whitelists changed)."""


class UsageError(Exception):
    """A command line arv-wrap cannot act on."""


class WhitelistError(Exception):
    """A whitelist that cannot be used; str() is one line: file, line, key, problem."""
