"""Telemetry, read from each finished ``Exchange``: Prometheus metrics (the ``Metrics``
catalogue in ``metrics``, ``observe``, the scrape-time ``collectors``, ``GET /metrics`` in
``scrape``), OpenTelemetry traces (spans in ``tracing``, names in ``conventions``, the
``OTEL_*`` variables in ``otel_env``) and request log lines (``logs``)."""
