"""``python -m benchmark.store {ls,verify,gc} --root PATH`` (see :mod:`benchmark.store.cli`)."""

import sys

from benchmark.store.cli import main

if __name__ == "__main__":
    sys.exit(main())
