"""lmforge.serve: an OpenAI-compatible HTTP server over the continuous-batching engine.

    from lmforge.serve import create_app, app_from_run, running_server
    with running_server("runs/sft") as url:         # real uvicorn on 127.0.0.1, a free port
        ...                                         # url + "/v1" is an OpenAI base_url

docs/serving.md lists the endpoints, fields, errors and metrics.
"""

from lmforge.serve.app import app_from_run, build_app, create_app
from lmforge.serve.server import running_server, serve
from lmforge.serve.served import ServedModel, load_served

__all__ = ["create_app", "app_from_run", "build_app", "running_server", "serve", "ServedModel", "load_served"]
