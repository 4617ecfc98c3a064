"""`vicuna serve`: controller, workers and an OpenAI-compatible API (see commands/serve.py)."""
