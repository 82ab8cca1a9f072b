"""The package's version, in a module of its own: the commands' `--version` reads it without importing the app."""

__version__ = "0.1.0"
