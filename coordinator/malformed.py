"""Requests whose bytes are no valid message: INVALID_ARGUMENT, not UNKNOWN with a traceback.

gRPC decodes a request before any servicer code runs, and a protobuf DecodeError there (bytes
cut short, a string field that is not UTF-8) reached the caller as UNKNOWN and the log as an
ERROR with a traceback per request: any caller could fill the log. This interceptor decodes
leniently, carrying the error to the call, which is then refused with INVALID_ARGUMENT naming
the method and the decoder's words. It runs inside the role check, so a caller without a role
is still refused as such first.

A stream of requests (a host's stream) is decoded as leniently, but an undecodable message
reaches the servicer as an `Undecodable`: its own tasks read the stream, and it ends the call
(INVALID_ARGUMENT) once what came before is committed. Left to gRPC, the error killed the task
reading the stream and nothing else: the host stayed connected, its events went unread and the
answers to its commands with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from coordinator.wrapping import Behavior, Decoder, WrappingInterceptor, same_kind

__all__ = ["MalformedRequests", "Undecodable"]


@dataclass(frozen=True)
class Undecodable:
    """What a request that is no valid message decodes to: the decoder's words."""

    error: str


def _lenient(decode: Decoder) -> Decoder:
    if decode is None:
        return None

    def lenient(raw: bytes) -> Any:
        try:
            return decode(raw)
        except DecodeError as err:
            return Undecodable(str(err) or "cannot be decoded")

    return lenient


class MalformedRequests(WrappingInterceptor):
    def decoder(self, method: str, decode: Decoder) -> Decoder:
        return _lenient(decode)

    def wrap(self, method: str, behavior: Behavior, streamed: bool = False) -> Behavior:
        if streamed:
            return behavior  # its reader meets the Undecodable and ends the call itself

        async def decoded(request: Any, context: Any) -> None:
            if isinstance(request, Undecodable):
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"a {method} request that is no valid message: {request.error}",
                )

        return same_kind(behavior, decoded)
