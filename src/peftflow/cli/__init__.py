"""The ``peftflow`` command line (:mod:`.main`), one module per group of commands:
:mod:`.experiments`, :mod:`.models`, :mod:`.studies`, :mod:`.data`, :mod:`.ui`.
Commands import the pipeline when they run, so listing or validating answers in a
second. Nothing is imported here.

Depends on: config, data, models, training, tracking, task, serving, reporting, pipeline.
"""
