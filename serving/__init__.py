"""The serving supervisor behind ``vllm.service``: runs the engine's container (DESIGN.md §2)."""
