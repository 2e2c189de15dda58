"""The attestation daemon (arrives with its own issue)."""
