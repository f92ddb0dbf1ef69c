"""Attribution methods, registered by name: one import line each is the registration."""

from methods import influence, unroll  # noqa: F401
from methods.base import Method, RemovalContext

__all__ = ["Method", "RemovalContext"]
