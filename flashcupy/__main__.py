"""python -m flashcupy: the same command line as `flashcupy`."""

from .cli import main

raise SystemExit(main())
