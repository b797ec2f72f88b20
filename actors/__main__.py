"""``python -m actors``: the ``actors`` command line (see ``actors/_cli.py``)."""

from ._cli import main

if __name__ == "__main__":
    main(prog_name="python -m actors")
