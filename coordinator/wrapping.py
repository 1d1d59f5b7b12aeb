"""What the coordinator's server interceptors share: a handler rebuilt around its behavior.

gRPC gives an interceptor the method's name and metadata only, not the call: what needs the
call (its certificate, its decoded request) wraps the handler's behavior instead. A wrapper
must be of the kind it wraps, since grpc.aio tells an async generator (it yields responses)
from a coroutine (it returns one) by the function itself; `same_kind` builds both.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

__all__ = ["Behavior", "Decoder", "WrappingInterceptor", "same_kind"]

Behavior = Callable[..., Any]
Decoder = Callable[[bytes], Any] | None


def same_kind(behavior: Behavior, before: Callable[[Any, Any], Awaitable[None]]) -> Behavior:
    """`behavior`, with `before(request, context)` awaited first (it may abort the call)."""
    if inspect.isasyncgenfunction(behavior):

        async def streaming(request: Any, context: Any) -> AsyncIterator[Any]:
            await before(request, context)
            async for response in behavior(request, context):
                yield response

        return streaming

    async def single(request: Any, context: Any) -> Any:
        await before(request, context)
        return await behavior(request, context)

    return single


class WrappingInterceptor(grpc.aio.ServerInterceptor):
    """Rebuilds every handler with `wrap(method, behavior)` and `decoder(method, decode)`."""

    def wrap(self, method: str, behavior: Behavior, streamed: bool = False) -> Behavior:
        """`behavior` rebuilt; `streamed`: its requests come as a stream (an async iterator),
        not one decoded request."""
        raise NotImplementedError

    def decoder(self, method: str, decode: Decoder) -> Decoder:
        return decode

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
        decode = self.decoder(method, handler.request_deserializer)
        encode = handler.response_serializer
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self.wrap(method, handler.unary_unary), decode, encode
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self.wrap(method, handler.unary_stream), decode, encode
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self.wrap(method, handler.stream_unary, streamed=True), decode, encode
            )
        assert handler.stream_stream is not None
        return grpc.stream_stream_rpc_method_handler(
            self.wrap(method, handler.stream_stream, streamed=True), decode, encode
        )
