"""Wrapping grpc.aio method handlers of every kind in a per-call scope.

The server's interceptors (request context, errors, auth) each need to run code around a
whole call: before the handler starts, and after it ends or raises, including the
streaming kinds, whose work happens while the response stream is iterated. This module
does that wrapping once; an interceptor only supplies an async context manager.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeAlias

import grpc
import grpc.aio

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"

CallScope: TypeAlias = (
    "Callable[[grpc.HandlerCallDetails, Context], AbstractAsyncContextManager[None]]"
)
"""Makes the scope of one call from its details and its context."""


class ScopedInterceptor(grpc.aio.ServerInterceptor):
    """A server interceptor that runs every call inside the scope *scope* makes.

    Parameters
    ----------
    scope : CallScope
        Called once per call; its context manager is entered before the handler runs
        and exited when the call ends. It may raise on entry (to refuse the call) or
        replace the exception the call ended with.
    """

    def __init__(self, scope: CallScope) -> None:
        self._scope = scope

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return wrap_handler(handler, lambda context: self._scope(handler_call_details, context))


def wrap_handler(
    handler: Handler,
    scope: Callable[[Context], AbstractAsyncContextManager[None]],
) -> Handler:
    """A handler of the same kind as *handler* whose calls run inside ``scope(context)``."""
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _wrap_unary(handler.unary_unary, scope),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            _wrap_unary(handler.stream_unary, scope),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _wrap_stream(handler.unary_stream, scope),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(
            _wrap_stream(handler.stream_stream, scope),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler


def _wrap_unary(
    behavior: Callable[..., Any],
    scope: Callable[[Context], AbstractAsyncContextManager[None]],
) -> Callable[..., Awaitable[Any]]:
    async def call(request: Any, context: Context) -> Any:
        async with scope(context):
            result = behavior(request, context)
            if inspect.isawaitable(result):
                result = await result
            return result

    return call


def _wrap_stream(
    behavior: Callable[..., Any],
    scope: Callable[[Context], AbstractAsyncContextManager[None]],
) -> Callable[..., AsyncIterator[Any]]:
    async def call(request: Any, context: Context) -> AsyncIterator[Any]:
        async with scope(context):
            result = behavior(request, context)
            if hasattr(result, "__aiter__"):
                try:
                    async for response in result:
                        yield response
                finally:
                    # Close the handler's generator now, in this task, rather than
                    # whenever the garbage collector gets to it.
                    aclose = getattr(result, "aclose", None)
                    if aclose is not None:
                        await aclose()
            elif inspect.isawaitable(result):
                # A handler that writes with context.write() and returns nothing.
                await result
            elif result is not None:
                for response in result:
                    yield response

    return call
