"""The shared core. Nothing here imports typer, so every capability is a Python function too."""
