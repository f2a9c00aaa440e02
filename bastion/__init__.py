"""Bastion: a metered, OpenAI-compatible API gateway for LLM inference."""

__version__ = "0.1.0"
