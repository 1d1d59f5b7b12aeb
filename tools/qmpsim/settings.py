"""Migration capabilities and parameters, as QEMU 7.2 names, checks and reports them."""

from __future__ import annotations

from typing import Any

from .wire import QmpError

__all__ = ["CAPABILITIES", "Settings"]

# Every capability QEMU 7.2 knows, in its order.
CAPABILITIES = [
    "xbzrle",
    "rdma-pin-all",
    "auto-converge",
    "zero-blocks",
    "compress",
    "events",
    "postcopy-ram",
    "x-colo",
    "release-ram",
    "block",
    "return-path",
    "pause-before-switchover",
    "multifd",
    "dirty-bitmaps",
    "postcopy-blocktime",
    "late-block-activate",
    "x-ignore-shared",
    "validate-uuid",
    "background-snapshot",
    "zero-copy-send",
    "postcopy-preempt",
]
# What the model follows; the others only change how a real stream is made, or not at all.
MODELLED = frozenset(("events", "postcopy-ram", "return-path", "pause-before-switchover"))
# Streams the simulated one does not pretend to be: switching them on is refused.
REFUSED = frozenset(
    [
        "xbzrle",
        "rdma-pin-all",
        "compress",
        "x-colo",
        "block",
        "multifd",
        "background-snapshot",
        "zero-copy-send",
        "postcopy-preempt",
    ]
)
INTEGER = "integer"
# QEMU 7.2's migrate-set-parameters arguments and their JSON types.
PARAMETERS = {
    **dict.fromkeys(
        [
            "announce-initial",
            "announce-max",
            "announce-rounds",
            "announce-step",
            "compress-level",
            "compress-threads",
            "decompress-threads",
            "throttle-trigger-threshold",
            "cpu-throttle-initial",
            "cpu-throttle-increment",
            "max-bandwidth",
            "downtime-limit",
            "x-checkpoint-delay",
            "multifd-channels",
            "xbzrle-cache-size",
            "max-postcopy-bandwidth",
            "max-cpu-throttle",
            "multifd-zlib-level",
            "multifd-zstd-level",
        ],
        INTEGER,
    ),
    **dict.fromkeys(("tls-creds", "tls-hostname", "tls-authz"), "string or null"),
    **dict.fromkeys(
        ("compress-wait-thread", "cpu-throttle-tailslow", "block-incremental"), "boolean"
    ),
    "multifd-compression": "string",
    "block-bitmap-mapping": "array",
}
DEFAULTS: dict[str, Any] = {
    "max-bandwidth": 134217728,  # 128 MiB/s
    "downtime-limit": 300,  # ms
    "max-postcopy-bandwidth": 0,  # 0: no limit
    "tls-creds": "",
    "tls-hostname": "",
    "tls-authz": "",
}
MAX_DOWNTIME_MS = 2000 * 1000


class Settings:
    def __init__(self) -> None:
        self.capabilities = dict.fromkeys(CAPABILITIES, False)
        self.parameters = dict(DEFAULTS)

    def __getitem__(self, capability: str) -> bool:
        return self.capabilities[capability]

    def set_capabilities(self, entries: list[Any]) -> None:
        wanted = {}
        for entry in entries:
            if not isinstance(entry, dict):
                raise QmpError("Invalid parameter type for 'capabilities', expected: object")
            name, state = entry.get("capability"), entry.get("state")
            if name not in self.capabilities:
                raise QmpError(f"Parameter 'capability' does not accept value '{name}'")
            if not isinstance(state, bool):
                raise QmpError("Invalid parameter type for 'state', expected: boolean")
            if state and name in REFUSED:
                raise QmpError(f"qmpsim does not simulate the migration capability '{name}'")
            wanted[name] = state
        self.capabilities.update(wanted)

    def set_parameters(self, arguments: dict[str, Any]) -> None:
        downtime = arguments.get("downtime-limit")
        if downtime is not None and not 0 <= downtime <= MAX_DOWNTIME_MS:
            raise QmpError(
                "Parameter 'downtime_limit' expects an integer in the range of 0 to "
                "(2000 * 1000) ms"
            )
        for name, value in arguments.items():
            self.parameters[name] = "" if value is None else value

    def bandwidth(self, link: float) -> float:
        """Bytes/s of pre-copy: max-bandwidth, within what the link carries."""
        limit = float(self.parameters["max-bandwidth"])
        return min(limit, link) if limit > 0 else link

    def postcopy_bandwidth(self, link: float) -> float:
        limit = float(self.parameters["max-postcopy-bandwidth"])
        return min(limit, link) if limit > 0 else link

    def threshold(self, link: float) -> float:
        """Bytes that may be left for the switchover: bandwidth x downtime limit."""
        return self.bandwidth(link) * float(self.parameters["downtime-limit"]) / 1000.0

    def query_capabilities(self) -> list[dict[str, Any]]:
        return [{"state": state, "capability": name} for name, state in self.capabilities.items()]
