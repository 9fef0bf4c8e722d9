"""The on-device side of DiReDi: the int8 runtime, reverse distillation and local privacy.

Imports numpy, the LiteRT (or TFLite) interpreter and the wire contract; never torch, never `cloud`.
"""
