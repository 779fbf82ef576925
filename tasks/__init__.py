"""Prefect tasks: thin wrappers over :mod:`peftflow.pipeline` adding retries and timeouts."""
