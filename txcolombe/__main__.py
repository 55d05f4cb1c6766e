"""``python -m txcolombe``: the command line (see :mod:`txcolombe.cli`)."""

from txcolombe.cli import main

if __name__ == "__main__":
    main()
