"""Sealed-model format: seal on the owner's machine, unseal into tmpfs on the attested VM."""
