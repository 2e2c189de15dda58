"""confinfer: confidential LLM inference on Azure confidential GPU VMs (shared core and CLI)."""

__version__ = "0.1.0"
