"""`python -m flashcupy.bench [options]`: the same as `flashcupy bench [options]`."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
