"""The telemetry wing: Prometheus metrics and OpenTelemetry traces, usable from every other wing (it imports
none of them)."""
