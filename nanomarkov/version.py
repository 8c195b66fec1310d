"""The package's version, written once: pyproject.toml reads it from here, `nanomarkov --version` prints it, and
neither needs importlib.metadata (which alone costs a tenth of the command line's start-up)."""

VERSION = "0.1.0"
