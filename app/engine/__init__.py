"""The inference engine: plain Python and torch, no HTTP."""
