"""qmpsim: a `qemu-system-x86_64` that runs no guest but speaks QEMU 7.2's QMP.

hostd runs it unchanged (`WHIMBREL_QEMU=tools/qmpsim/qemu-system-x86_64`): it takes hostd's
command line, daemonizes like QEMU (the parent exits 0 once the pidfile is written and the QMP
socket listens), answers QMP as the transcripts in ../shared/qmp-transcripts/ show, and migrates
to another qmpsim over the socket the migration URI names, with a small protocol of simulated
progress in place of guest RAM. One small asyncio process per VM, asleep when nothing happens.

Modules, one concept each:
- `cmdline`: QEMU's argv, what is modelled, ignored, or refused.
- `daemon`: -daemonize, -pidfile, -runas, and the cleanup of an orderly exit.
- `knobs`: the simulated guest and link (environment), and scaled time.
- `wire`: the QMP wire protocol (greeting, negotiation, framing, ids, out of band, events).
- `machine`: the run state (query-status, cont, stop, quit, announce-self, object-add).
- `migration`: the migration model, source and destination, and its QMP commands.
- `link`: the migration stream between two qmpsim processes.
- `forkserver`, `launch`: one pre-imported process that forks every VM (pages shared), and the
  launcher's side of it; used when WHIMBREL_QMPSIM_FORKSERVER names the server's socket.

Environment (read once at start; both ends of a migration should agree on the speed):
- `WHIMBREL_QMPSIM_SPEED`: simulated seconds per real second (default 1).
- `WHIMBREL_QMPSIM_DIRTY_RATE`: bytes per simulated second the guest dirties (default 0).
- `WHIMBREL_QMPSIM_LINK`: bytes per simulated second the link carries at most (default 1 GiB).
- `WHIMBREL_QMPSIM_FORKSERVER`: the socket of a running fork server to launch VMs through.
- `WHIMBREL_QMPSIM_KNOBS`: a JSON file of per-VM knobs, by VM name (`-name`) or "*":
  `{"vm-1": {"dirty_rate": 8388608, "link": 104857600}}`; it overrides the variables above.
"""
