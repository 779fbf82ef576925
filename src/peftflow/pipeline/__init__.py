"""The pipeline: its stages (:mod:`.stages`), the order they run in, declared once
(:mod:`.definition`), the typed results they hand on (:mod:`.results`), and the ways of
running it: data-parallel training (:mod:`.launch`), studies (:mod:`.study`), the
scheduled refresh (:mod:`.refresh`) and reproductions (:mod:`.reproduce`). Nothing is
imported here.

Depends on: config, data, models, training, evaluation, tracking, task, serving.
"""
