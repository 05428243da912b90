"""``python -m lightning_ldb``: the ``ldb`` command (see :mod:`lightning_ldb.cli`)."""

from lightning_ldb.cli import main

if __name__ == "__main__":
    main(prog="python -m lightning_ldb")
