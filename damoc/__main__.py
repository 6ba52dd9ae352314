"""`python -m damoc ...`: the CLI without the console script (a `ray job submit` working dir)."""

from damoc.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
