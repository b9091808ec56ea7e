"""One module per CLI verb; each exposes `register(subparsers)` and sets `func` on its parser."""
