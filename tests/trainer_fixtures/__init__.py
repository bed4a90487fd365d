"""Fixtures for the trainer tests: a tiny Llama-shaped model, its tokenizer, data, an S3 server."""
