"""Prefect tasks: thin wrappers over the pipeline's stages, adding retries, timeouts and caching."""
