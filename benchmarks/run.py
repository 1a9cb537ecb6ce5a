"""rca's cost benchmarks: `make bench` (or `python benchmarks/run.py`), `--smoke` for CI.

The measurements, the driver and the report are ``rca.bench.cost``; this script runs its
``main`` with the same options (``python -m rca.bench.cost`` is the same command).
"""

from rca.bench.cost import main

if __name__ == "__main__":
    raise SystemExit(main())
