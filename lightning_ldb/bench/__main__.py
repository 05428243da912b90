"""``python -m lightning_ldb.bench``: the same as the ``ldb-bench`` command."""

from lightning_ldb.bench.cli import main

raise SystemExit(main())
