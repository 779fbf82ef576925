"""Models and methods: where weights come from (:mod:`.assets`), the backbone
(:mod:`.backbone`), the two model kinds (:mod:`.classifier`, :mod:`.causal_lm`), the
attention they run (:mod:`.attention`), what the checks know of a model before loading it
(:mod:`.facts`), the fine-tuning methods (:mod:`.methods`) and saved model folders
(:mod:`.saved`). Nothing is imported here.

Depends on: config.
"""
