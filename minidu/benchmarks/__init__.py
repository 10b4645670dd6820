"""The serving benchmark's harness, not the engine (which never imports it): workloads, metrics, the driver that
replays a workload against an Engine, and the client that replays it against any OpenAI-compatible server."""
