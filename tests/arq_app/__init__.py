"""An arq app run by a real worker process in tests/test_arq.py."""
