"""A procrastinate app run by a real worker process in the tests."""
