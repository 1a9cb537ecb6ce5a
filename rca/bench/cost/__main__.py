"""``python -m rca.bench.cost``: the cost benchmarks (``rca.bench.cost.main``)."""

from rca.bench.cost.driver import main

raise SystemExit(main())
