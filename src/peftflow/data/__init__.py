"""Data: raw sources -> one standard table -> a DVC-versioned parquet file -> splits -> token ids.

Sources: :mod:`.email_parse` (raw mail to text), :mod:`.spamassassin` (the pinned npm
corpus), :mod:`.subjects` (its body -> subject pairs), :mod:`.loaders` (every source to
the standard table of :mod:`.schema`). Versions: :mod:`.dvc_repo` (the repo and the md5 a
``.dvc`` file records), :mod:`.dvc_store` (track, push, pull), :mod:`.dvc_integrity`
(re-hash and repair every copy), :mod:`.ingest` (the stage that ties them together).
Then :mod:`.split` (deterministic, leakage-free splits) and the encodings of the two
tasks (:mod:`.encoding`, :mod:`.prompting`). Nothing is imported here, so parsing mail
does not pay for importing DVC.

Depends on: config.
"""
