"""llmsh: an operating-system shell for language models."""

__version__ = "0.1.0"
