"""lmforge platform glue: the `lmforge` CLI, config loading, tracking and storage helpers."""

__version__ = "0.1.0"
