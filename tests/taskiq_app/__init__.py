"""The taskiq application that tests/test_taskiq.py runs in real ``taskiq worker`` processes."""
