"""CoLLM replica agent: one process that serves a LoRA-adapted LLM and fine-tunes it at once."""

__version__ = "0.1.0"
