"""Ray Serve application: the OpenAI-compatible HTTP API over the batching engine."""
