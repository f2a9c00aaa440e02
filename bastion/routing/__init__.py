"""Fleet-aware routing: which upstream replica serves a request (docs/routing.md)."""

from bastion.routing.collector import RoutingCollector
from bastion.routing.router import Router

__all__ = ["Router", "RoutingCollector"]
