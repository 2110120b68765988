"""mmgpt: an OpenAI-compatible server for multimodal GPTs."""

__version__ = "0.1.0"
