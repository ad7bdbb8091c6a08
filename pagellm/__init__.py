"""PageLLM: whole-page recommendation with multi-grained RLHF on Ray."""

__version__ = "0.1.0"
