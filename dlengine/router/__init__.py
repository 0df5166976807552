"""`dlengine router`: an OpenAI-compatible HTTP front for hybrid, prefill and decode servers.

    app = create_router_app(RouterConfig(hybrid=["http://127.0.0.1:8001"], policy="least-load"))

See docs/serving.md ("Router") for the policies, the PD orchestration and discovery.
"""

from dlengine.router.app import create_router_app
from dlengine.router.config import RouterConfig

__all__ = ["create_router_app", "RouterConfig"]
