"""Small FastAPI, Starlette and Litestar apps that tests/test_frameworks.py serves on uvicorn."""
