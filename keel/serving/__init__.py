"""Real-time serving: ``keel serve``, a FastAPI app over the Feast online store and the registry.

Modules: ``app`` (the app factory), ``features`` (online lookup with event times), ``cache``
(prediction cache), ``auth`` (API keys and roles), ``metrics`` (Prometheus), ``prediction_log``
(the durable log), ``settings`` (serve settings); ``deployments`` and ``admin_routes`` hold what
is deployed and how it is released. Nothing heavy is imported here.
"""
