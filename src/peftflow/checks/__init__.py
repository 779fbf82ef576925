"""Great Expectations data checks: one module per suite, the engine and the report.

Classification: :mod:`.raw_data`, :mod:`.split_integrity`, :mod:`.tokenisation`.
Generation: :mod:`.generation_raw_data`, :mod:`.generation_split_leakage`,
:mod:`.generation_tokenisation`. :mod:`.engine` runs checks through GX,
:mod:`.report` is what a suite returns and writes, :mod:`.common` holds the
building blocks several suites share. Nothing is imported here.

Depends on: config, data.
"""
