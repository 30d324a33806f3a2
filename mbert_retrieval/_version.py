"""The release number, read by the package, the saved models' metadata and the build (pyproject.toml)."""

__version__ = "0.1.0"
