"""olmo-local: run Olmo Hybrid models locally."""

from olmo_local.errors import OlmoError

__version__ = "0.1.0"
__all__ = ["OlmoError", "__version__"]
