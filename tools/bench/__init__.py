"""Benchmarks. Each prints one JSON object per line: {"bench", "value", "unit", "baseline"},
and whatever else a benchmark reports (the switchover benches: "ratio", "samples", "rejected",
"scheduling"; the guest outage benches also "connections_lost", "rewinds", "pause_ms").

Run all with `make bench`, one with `make bench BENCH=log.append.100_writers` (a prefix such as
`log.append` selects several). Baselines are measured in the same run on the same machine.
`WHIMBREL_BENCH_RUNS=N` sets the migrations per side of the switchover benches (default 100)
and of the guest outage benches (default 50). `guest.big.auto` reports one migration of a
1 GiB Linux guest dirtying memory faster than pre-copy sends it (no baseline: it reports how
auto mode ended, its passes, bytes, time and pause). `switchover.restart.precopy` reports what
a source hostd restart during pre-copy adds to the pause (restarted runs against undisturbed
ones, interleaved; 20 each); `switchover.tls.postcopy` the pause with mutual TLS on the
control channels against the same run's insecure loopback cluster, interleaved;
`switchover.flood.postcopy` (and `.precopy`) the pause under a flood of reads (50 watchers and a
ListMigrations loop) against the same cluster's pause with none in flight, interleaved.
`ingest.grpc.100_streams` reports durable events/s from 100 hostd-like TLS streams through a
real coordinator, with its CPU seconds and ack latency, against the log alone (`ratio`).
`scale.drain.1000vms` drains 10 of 50 hostd (1,000 VMs on qmpsim) at once under migration
limits and reports the drain's time, the coordinator's CPU, events/s, command latency, memory,
the audit's verdict and a recount of the limits, with `met` per target of issue 15;
`scale.drain.100vms` is the same at 10 hosts of 10 VMs, 2 drained, for a quick run.
"""
