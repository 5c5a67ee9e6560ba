"""A dramatiq app run by real worker processes in tests/test_dramatiq.py."""
