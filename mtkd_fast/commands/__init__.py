"""One module per ``mtkd-fast`` verb; each defines ``register(subparsers)`` and sets ``func`` on its parser."""
