"""``adn serve``: an HTTP server that classifies images with an adaptive depth network, batching requests
dynamically and letting :class:`adn.Governor` choose each batch's depth from the time left.

One module per job: ``policy`` (when a batch leaves and at which depth: no clock, no thread),
``batcher`` (the queue and its worker thread), ``engine`` (a batch at a depth, every depth prepared
ahead), ``service`` (all of it around one checkpoint), ``metrics`` (Prometheus), ``app`` (the HTTP
routes), ``server`` (uvicorn, graceful shutdown), ``connections`` (request deadline, connection cap), ``logs``
(throttled error lines). Needs the ``serve`` extra: ``pip install 'adn[serve]'``.

    from adn.serve import ServeSettings, Service, create_app
    service = Service.from_checkpoint("runs/demo/checkpoint.pt", ServeSettings(budget_ms=20))
    app = create_app(service)          # any ASGI server runs it; adn serve uses uvicorn
"""

from .app import create_app
from .policy import BatchPolicy, Pending, Plan
from .service import ServeSettings, Service

__all__ = ["BatchPolicy", "Pending", "Plan", "ServeSettings", "Service", "create_app"]
