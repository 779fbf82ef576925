"""MLflow: runs and their tags (:mod:`.runs`), logging and registering models
(:mod:`.registration`), gated promotion with aliases (:mod:`.promotion`) under a
registry lock (:mod:`.locks`). Nothing is imported here.

Depends on: config, evaluation.
"""
