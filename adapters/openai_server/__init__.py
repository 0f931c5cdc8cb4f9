"""An OpenAI-compatible HTTP server over a `LlamaEngine` (needs the `server` extra).

```python
from llama_runtime import create_engine
from adapters.openai_server import create_app

app = create_app(create_engine())          # a FastAPI app; serve it with uvicorn
```

or from the shell: `llama-engine serve --model smollm2-135m-instruct --port 8000`. Endpoints,
extensions and metrics: docs/server.md.
"""

from __future__ import annotations

from adapters._extras import missing_extra

try:
    import fastapi  # noqa: F401
    import prometheus_client  # noqa: F401
    import sse_starlette  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on what is installed
    raise missing_extra("adapters.openai_server", "server", e) from e

from adapters.openai_server.app import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_REQUESTS,
    create_app,
)

__all__ = ["DEFAULT_MAX_BODY_BYTES", "DEFAULT_MAX_REQUESTS", "create_app"]
