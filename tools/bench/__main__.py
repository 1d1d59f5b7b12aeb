"""Entry point: python -m tools.bench [NAME-or-prefix ...]."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

from tools.bench import (
    guest_big,
    guest_outage,
    ingest_bench,
    log_bench,
    migration_tls,
    recovery_bench,
    restart_pause,
    scale_drain,
    switchover,
    whatif_error,
)
from tools.cluster import tear_down_on_sigterm

Result = dict[str, object]
# A benchmark returns one result, or several (e.g. p50 and p99 of one run).
BENCHES: dict[str, Callable[[], Result | list[Result]]] = {
    "log.append.1_writer": lambda: log_bench.append_bench(1),
    "log.append.10_writers": lambda: log_bench.append_bench(10),
    "log.append.100_writers": lambda: log_bench.append_bench(100),
    "log.replay.1m": lambda: log_bench.replay_bench(1_000_000),
    "ingest.grpc.100_streams": lambda: ingest_bench.bench(100),
    "recovery.10k": lambda: recovery_bench.bench(10_000),
    "recovery.100k": lambda: recovery_bench.bench(100_000),
    "recovery.1m": lambda: recovery_bench.bench(1_000_000),
    "switchover.pause.postcopy": lambda: switchover.bench("postcopy"),
    "switchover.pause.precopy": lambda: switchover.bench("precopy"),
    "switchover.flood.postcopy": lambda: switchover.flood_bench("postcopy"),
    "switchover.flood.precopy": lambda: switchover.flood_bench("precopy"),
    "switchover.restart.precopy": restart_pause.bench,
    "switchover.tls.postcopy": lambda: switchover.tls_bench("postcopy"),
    "migration.tls": migration_tls.bench,
    "whatif.model_error": whatif_error.bench,
    "guest.outage.postcopy": lambda: guest_outage.bench("postcopy"),
    "guest.outage.precopy": lambda: guest_outage.bench("precopy"),
    "guest.big.auto": guest_big.bench,
    "scale.drain.1000vms": scale_drain.bench,
    "scale.drain.100vms": lambda: scale_drain.bench(hosts=10, vms_per_host=10, drained=2),
}


def main(argv: list[str]) -> int:
    tear_down_on_sigterm()
    wanted = [n for n in BENCHES if not argv or any(n == a or n.startswith(a) for a in argv)]
    if not wanted:
        print(f"no benchmark matches {argv}; known: {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    for name in wanted:
        result = BENCHES[name]()
        for one in result if isinstance(result, list) else [{"bench": name, **result}]:
            print(json.dumps(one), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
