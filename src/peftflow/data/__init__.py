"""Data ingestion: raw sources -> one standard table -> a DVC-versioned parquet file.

Modules: :mod:`.email_parse` (raw mail to text), :mod:`.spamassassin` (the
pinned npm corpus), :mod:`.loaders` (every source to the standard table of
:mod:`.schema`), :mod:`.dvc_store` (DVC repo, track, push, pull) and
:mod:`.ingest` (the stage that ties them together). Nothing is imported here, so
parsing mail does not pay for importing DVC.
"""
