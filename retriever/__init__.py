"""retriever: scaling sparse and dense retrievers built on decoder-only LLMs, on Ray."""

__version__ = "0.1.0"
