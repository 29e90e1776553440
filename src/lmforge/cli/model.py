"""CLI for this stage (to be filled in)."""


def register(subparsers):
    pass
