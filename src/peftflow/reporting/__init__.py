"""Reports over many runs: a study's report (:mod:`.study_report`), the ranking of an
experiment's variants with their Pareto fronts (:mod:`.compare`), and their plots
(:mod:`.plots`). Nothing is imported here.

Depends on: config, tracking.
"""
