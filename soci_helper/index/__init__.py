"""SOCI indexes: building (create, convert), serializing and finding them."""
