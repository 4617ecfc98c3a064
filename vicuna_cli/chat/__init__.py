"""Chat: a conversation over a backend (local model or OpenAI-compatible server), and its REPL."""
