"""The HTTP service: OpenAI-compatible routes, management routes, the event stream."""
