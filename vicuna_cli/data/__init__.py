"""Conversation data: fetch datasets, clean them the Vicuna way, and describe them.

`fetch` downloads (Hub, HTTP with resume, local copy) with a manifest; `pipeline.clean` reads
ShareGPT / OpenAI messages / Alpaca files as a stream, converts exported HTML to Markdown,
normalises roles, filters, de-duplicates and splits long conversations with the model's own
tokenizer and template, over several processes with a deterministic output order. Nothing
here imports typer: `vicuna data ...` is a thin layer over these functions.
"""
