"""Worked examples of what a manufacturer brings to DiReDi fleet (docs/model-families.md)."""
