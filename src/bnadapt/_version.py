"""The package version, in one place (read by the package, result headers and bank files)."""

__version__ = "0.1.0"
