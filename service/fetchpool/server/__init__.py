"""The gRPC layer: servicers, health, reflection, start-up and drain. No fetching logic here."""

from fetchpool.server.app import serve

__all__ = ["serve"]
