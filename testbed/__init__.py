"""Local stand-ins for Azure's side of the wire: vTPM on swtpm, IMDS, MAA, Key Vault, a fake GPU.

This package is an independent implementation of the services' side. It imports nothing from
``confinfer``, ``loader`` or ``attestd``, so a misread format cannot hide behind shared code.
"""
