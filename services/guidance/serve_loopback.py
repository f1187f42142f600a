"""Keeps the local Ray Serve instance's own gRPC servers on 127.0.0.1 (`start_local` only).

Ray 2.60 binds two gRPC servers to the wildcard address with no option to change it: the Serve proxy's gRPC
ingress (`[::]:<grpc port>`) and each replica's inter-deployment server (`[::]:0`). `start_local` installs `patch`
as Ray's `worker_process_setup_hook`, so that in every Ray worker process (proxy and replicas included) those
two calls bind to 127.0.0.1 instead. Clusters (KubeRay) do not use it: there the pod network and the service
token guard the proxy. Imports nothing heavy: it runs at every worker's start.
"""

from __future__ import annotations

import os

LOOPBACK_ENV = "MAGIC3D_SERVE_LOOPBACK"
_WILDCARD = "[::]:"


def loopback_address(address: str) -> str:
    return "127.0.0.1:" + address[len(_WILDCARD):] if address.startswith(_WILDCARD) else address


def patch() -> None:
    """Ray's worker_process_setup_hook: rebinds the hard-coded wildcard gRPC addresses to 127.0.0.1."""
    if os.environ.get(LOOPBACK_ENV) != "1":
        return
    from ray.serve._private import default_impl, replica

    original_add = default_impl.add_grpc_address
    original_port = replica.add_port_to_grpc_server

    def add_grpc_address(server, address: str):
        return original_add(server, loopback_address(address))

    def add_port_to_grpc_server(server, address: str):
        return original_port(server, loopback_address(address))

    default_impl.add_grpc_address = add_grpc_address
    replica.add_port_to_grpc_server = add_port_to_grpc_server
