"""HTTP service: REST API under /v1 and the web page at /."""

from snapshop.service.app import create_app, serve
from snapshop.service.settings import ServiceSettings, api_key_from_env

__all__ = ["ServiceSettings", "api_key_from_env", "create_app", "serve"]
