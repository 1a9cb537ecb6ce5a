"""``python -m rca``: the same as the ``rca`` command."""

from rca.cli import main

if __name__ == "__main__":
    main()
