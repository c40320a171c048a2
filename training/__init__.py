"""Offline training package: archive -> model -> checkpoint -> bundle (PyTorch lives only here)."""
