"""`minidu serve`: an OpenAI-compatible HTTP server (FastAPI, uvicorn) over one Engine driven by a background loop."""
