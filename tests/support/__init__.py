"""Test support: real registries, layers and images built by the tests."""
