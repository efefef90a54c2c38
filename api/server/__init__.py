"""HTTP server: the app's composition, uvicorn, configuration, health, metrics, local workers."""
