"""A control server of your own, built on ``selfupgrade.server`` in a page.

``selfupgrade-hbs`` is the full server (cfg.json, flags, tokens, TLS, Redis). This example shows
the pieces it is made of, for a server that embeds them differently: one store, one control
plane, the HTTP app (heartbeats, the seed's ``/agent/upgrade``, the rollouts API) and the falcon
agents' JSON-RPC listener sharing one heartbeat batcher::

    python -m examples.hbs_server --store sqlite:/tmp/my-hbs.db --http 127.0.0.1:6031
"""

from __future__ import annotations

import argparse
import asyncio

import uvicorn

from selfupgrade.server import ControlPlane, PlaneConfig, TaskLimits, open_store
from selfupgrade.server.app import create_app
from selfupgrade.server.batch import HeartbeatBatcher
from selfupgrade.server.falcon_rpc import serve_falcon_rpc


async def serve(store_url: str, http: tuple[str, int], rpc: tuple[str, int]) -> None:
    """Serve HTTP on ``http`` and falcon JSON-RPC on ``rpc`` until interrupted."""
    store = open_store(store_url)
    plane = ControlPlane(store, PlaneConfig(limits=TaskLimits(max_in_flight=5, failure_limit=3)))
    beats = HeartbeatBatcher(plane.answer)
    listener = await serve_falcon_rpc(plane, *rpc, batcher=beats)
    app = create_app(plane, batcher=beats)
    server = uvicorn.Server(uvicorn.Config(app, host=http[0], port=http[1], log_level="info"))
    try:
        await server.serve()
    finally:
        listener.close()
        beats.close()
        plane.fleet.flush()
        store.close()


def main() -> None:
    """Parse ``--store``, ``--http`` and ``--rpc``, then serve."""
    parser = argparse.ArgumentParser(prog="python -m examples.hbs_server")
    parser.add_argument("--store", default="sqlite:my-hbs.db")
    parser.add_argument("--http", default="127.0.0.1:6031")
    parser.add_argument("--rpc", default="127.0.0.1:6030")
    args = parser.parse_args()

    def address(text: str) -> tuple[str, int]:
        host, _, port = text.rpartition(":")
        return host, int(port)

    asyncio.run(serve(args.store, address(args.http), address(args.rpc)))
