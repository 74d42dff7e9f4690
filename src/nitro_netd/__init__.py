"""nitro-netd: ordinary networking for AWS Nitro Enclaves over vsock."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
