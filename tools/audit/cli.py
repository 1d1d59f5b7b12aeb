"""whimbrel-audit: verify and explain a Whimbrel event log, offline.

whimbrel-audit verify DB [--expect-head SEQ:HASH] [--final]
                                                    exit 0 clean, 1 violations, 2 unreadable
whimbrel-audit verify --against HOST:PORT           the same, through a live coordinator
               [--tls-cert F --tls-key F --tls-ca F]  (mutual TLS; needs the viewer role)
whimbrel-audit head DB                              print SEQ:HASH of the chain head
whimbrel-audit timeline DB --migration ID [--json]  a migration's story, pause and outcome
whimbrel-audit state DB --at SEQ | --at-time T      derived state at that point of history
whimbrel-audit export DB --format jsonl             every event as one JSON object per line
whimbrel-audit why DB SEQ [--json]                  the chain of causes behind an event
whimbrel-audit whatif DB --migration ID --policy NAME|FILE [--json]
                                                    a recorded migration under another policy
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from google.protobuf import json_format

from coordinator.core import CoreError
from whimbrel.tls import add_tls_flags, tls_files

from . import state, timeline, whatif, why
from .checks import verify, verify_events
from .display import joined, printable
from .logfile import Unreadable, checked_events, head, open_log, read_events
from .remote import remote_events

EXIT_CLEAN, EXIT_VIOLATIONS, EXIT_UNREADABLE = 0, 1, 2


def complain(message: str) -> None:
    """One line on stderr; what it quotes of the log cannot start another."""
    print(printable(f"whimbrel-audit: {message}"), file=sys.stderr)


def cmd_verify(ns: argparse.Namespace) -> int:
    expect_seq, expect_hash = 0, b""
    if ns.expect_head:
        seq, _, digest = ns.expect_head.partition(":")
        expect_seq, expect_hash = int(seq), bytes.fromhex(digest)
    if ns.against:
        events = remote_events(ns.against, tls_files(ns, ns.parser))
        report = verify_events(events, None, expect_seq, expect_hash, final=ns.final)
    elif ns.db:
        report = verify(Path(ns.db), expect_seq, expect_hash, final=ns.final)
    else:
        raise ValueError("verify needs a DB path or --against HOST:PORT")
    if ns.json:
        findings = [{"seq": f.seq, "problem": f.what} for f in report.findings]
        print(
            json.dumps(
                {
                    "ok": report.ok,
                    "events": report.events,
                    "head_seq": report.head_seq,
                    "head_hash": report.head_hash.hex(),
                    "findings": findings,
                    "in_flight": report.in_flight,
                }
            )
        )
    elif report.ok:
        lines = [f"ok: {report.events} events, head {report.head_seq}:{report.head_hash.hex()}"]
        if report.in_flight:
            lines.append(f"in flight: {', '.join(report.in_flight)}")
        print(joined(lines))
    else:
        first, *more = report.findings
        lines = [f"VIOLATION at seq {first.seq}: {first.what}"]
        lines += [f"  also at seq {finding.seq}: {finding.what}" for finding in more]
        print(joined(lines))
    return EXIT_CLEAN if report.ok else EXIT_VIOLATIONS


def cmd_head(ns: argparse.Namespace) -> int:
    last = head(open_log(Path(ns.db)))
    print(f"{last.seq}:{last.hash.hex()}" if last else "0:" + "00" * 32)
    return EXIT_CLEAN


def cmd_timeline(ns: argparse.Namespace) -> int:
    events = list(read_events(open_log(Path(ns.db))))
    t = timeline.build(events, ns.migration)
    if not t.entries:
        complain(f"no migration {ns.migration!r} in {ns.db}")
        return EXIT_VIOLATIONS
    if ns.json:
        print(json.dumps(dataclasses.asdict(t)))
    else:
        print(timeline.render(t))
    return EXIT_CLEAN


def cmd_whatif(ns: argparse.Namespace) -> int:
    events = list(read_events(open_log(Path(ns.db))))
    try:
        result = whatif.whatif(events, ns.migration, ns.policy)
    except (CoreError, ValueError) as err:  # a policy, or a migration, it cannot replay
        complain(str(err))
        return EXIT_VIOLATIONS
    except (json_format.ParseError, OSError, UnicodeDecodeError) as err:
        complain(f"policy file {ns.policy}: {err}")
        return EXIT_UNREADABLE
    print(whatif.as_json(result) if ns.json else whatif.render(result))
    return EXIT_CLEAN


def cmd_state(ns: argparse.Namespace) -> int:
    events = read_events(open_log(Path(ns.db)))
    world = state.at(events, seq=ns.at or 0,
                     time_us=state.parse_time(ns.at_time) if ns.at_time else 0)  # fmt: skip
    described = state.describe(world)
    print(json.dumps(described) if ns.json else state.render(described))
    return EXIT_CLEAN


def cmd_export(ns: argparse.Namespace) -> int:
    for stored, event in checked_events(open_log(Path(ns.db))):
        print(
            json.dumps(
                {
                    "seq": stored.seq,
                    "stream": stored.stream,
                    "type": stored.type,
                    "epoch": stored.epoch,
                    "time_us": stored.time_us,
                    "origin": {
                        "host": stored.origin_host,
                        "generation": stored.origin_generation,
                        "seq": stored.origin_seq,
                    }
                    if stored.origin_host
                    else None,
                    "payload": json_format.MessageToDict(
                        event.payload, preserving_proto_field_name=True
                    ),
                    "prev_hash": stored.prev_hash.hex(),
                    "hash": stored.hash.hex(),
                }
            )
        )
    return EXIT_CLEAN


def cmd_why(ns: argparse.Namespace) -> int:
    links = why.chain(read_events(open_log(Path(ns.db))), ns.seq)
    if not links:
        complain(f"no event {ns.seq} in {ns.db}")
        return EXIT_VIOLATIONS
    if ns.json:
        print(json.dumps([dataclasses.asdict(link) for link in links]))
    else:
        print(why.render(links))
    return EXIT_CLEAN


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="whimbrel-audit", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="verify chain, order, epochs and safety invariants")
    v.add_argument("db", nargs="?")
    v.set_defaults(parser=v)
    v.add_argument("--against", metavar="HOST:PORT", help="read the log of a live coordinator")
    add_tls_flags(v)  # for --against: a certificate with the viewer role
    v.add_argument("--expect-head", help="SEQ:HASH printed earlier by `head`")
    v.add_argument(
        "--final",
        action="store_true",
        help="the system is settled: a migration not finished (8) or a command neither "
        "answered nor superseded (6) is a violation",
    )
    v.add_argument("--json", action="store_true")
    v.set_defaults(run=cmd_verify)
    w = sub.add_parser("why", help="the chain of causes behind an event, back to its start")
    w.add_argument("db")
    w.add_argument("seq", type=int)
    w.add_argument("--json", action="store_true")
    w.set_defaults(run=cmd_why)
    h = sub.add_parser("head", help="print the chain head to anchor it elsewhere")
    h.add_argument("db")
    h.set_defaults(run=cmd_head)
    t = sub.add_parser("timeline", help="a migration's phases, commands, pause and outcome")
    t.add_argument("db")
    t.add_argument("--migration", required=True)
    t.add_argument("--json", action="store_true")
    t.set_defaults(run=cmd_timeline)
    s = sub.add_parser("state", help="derived state at a point of history")
    s.add_argument("db")
    when = s.add_mutually_exclusive_group(required=True)
    when.add_argument("--at", type=int, help="after this seq")
    when.add_argument("--at-time", help="at this time (ISO 8601, or microseconds since 1970)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(run=cmd_state)
    wi = sub.add_parser("whatif", help="a recorded migration replayed under another policy")
    wi.add_argument("db")
    wi.add_argument("--migration", required=True)
    wi.add_argument("--policy", required=True, help="a policy stored in the log, or a JSON file")
    wi.add_argument("--json", action="store_true")
    wi.set_defaults(run=cmd_whatif)
    x = sub.add_parser("export", help="export every event")
    x.add_argument("db")
    x.add_argument("--format", choices=["jsonl"], default="jsonl")
    x.set_defaults(run=cmd_export)
    ns = parser.parse_args(argv)
    try:
        return int(ns.run(ns))
    except Unreadable as err:
        complain(f"unreadable: {err}")
        return EXIT_UNREADABLE
    except ValueError as err:
        complain(str(err))
        return EXIT_UNREADABLE


if __name__ == "__main__":
    sys.exit(main())
