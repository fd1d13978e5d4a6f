"""domainchat: a vertical-domain chatbot on one 4-bit base model with a LoRA adapter per vertical."""

__version__ = "0.1.0"
