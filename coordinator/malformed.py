"""Requests whose bytes are no valid message: INVALID_ARGUMENT, not UNKNOWN with a traceback.

gRPC decodes a request before any servicer code runs, and a protobuf DecodeError there (bytes
cut short, a string field that is not UTF-8) reached the caller as UNKNOWN and the log as an
ERROR with a traceback per request: any caller could fill the log. This interceptor decodes
leniently, carrying the error to the call, which is then refused with INVALID_ARGUMENT naming
the method and the decoder's words. It runs inside the role check, so a caller without a role
is still refused as such first. Calls with one request only: a stream of requests (a host's
stream) is read by the servicer's own tasks, where a refusal cannot end the call.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

__all__ = ["MalformedRequests"]

Behavior = Callable[..., Any]


@dataclass(frozen=True)
class _Undecodable:
    error: str


def _lenient(decode: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if decode is None:
        return None

    def lenient(raw: bytes) -> Any:
        try:
            return decode(raw)
        except DecodeError as err:
            return _Undecodable(str(err) or "cannot be decoded")

    return lenient


async def _refuse(method: str, request: _Undecodable, context: Any) -> None:
    await context.abort(
        grpc.StatusCode.INVALID_ARGUMENT, f"a {method} request that is no valid message: "
        f"{request.error}",
    )  # fmt: skip


class MalformedRequests(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method: str = handler_call_details.method
        decode = _lenient(handler.request_deserializer)
        encode = handler.response_serializer
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _checked(method, handler.unary_unary), decode, encode
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _checked(method, handler.unary_stream), decode, encode
            )
        # A stream of requests (a host's stream) is read by the servicer's own tasks, where
        # a refusal cannot end the call: it keeps gRPC's decoding.
        return handler


def _checked(method: str, behavior: Behavior) -> Behavior:
    """A call with one request: refused before the servicer when it did not decode. The
    wrapper is of the kind it wraps (grpc.aio tells a generator from a coroutine by it)."""
    if inspect.isasyncgenfunction(behavior):

        async def streaming(request: Any, context: Any) -> AsyncIterator[Any]:
            if isinstance(request, _Undecodable):
                await _refuse(method, request, context)
            async for response in behavior(request, context):
                yield response

        return streaming

    async def single(request: Any, context: Any) -> Any:
        if isinstance(request, _Undecodable):
            await _refuse(method, request, context)
        return await behavior(request, context)

    return single
