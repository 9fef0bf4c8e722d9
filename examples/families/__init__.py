"""Model families defined outside the product, named by their import path (docs/model-families.md)."""
