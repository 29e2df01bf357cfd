"""What keeps an upstream's faults and a burst of clients from spreading: retries within a
budget (``retry``), a circuit breaker (``breaker``), an adaptive concurrency limit with a
bounded, fair queue (``limiter``), and the degraded mode (``degraded``)."""
