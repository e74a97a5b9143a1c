"""The package version, read by setup.py without importing soteria."""

__version__ = "0.1.0"
