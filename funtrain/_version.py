"""The one place the version lives (pyproject.toml reads it; see CONTRIBUTING, Releases)."""

__version__ = "0.2.0.dev0"
