"""The command line: parses and checks options, prints, returns exit codes; nothing here computes a score.

``app`` holds the commands, ``args`` the option groups they share, ``preflight`` the checks that run
before torch is imported, so that a mistake fails in a fraction of a second.
"""

from winclip_cli.cli.app import app, main

__all__ = ["app", "main"]
