"""Scores: classification metrics and confusion matrices (:mod:`.classification_metrics`),
BLEU/chrF/ROUGE for generated text (:mod:`.text_metrics`), and the TF-IDF + logistic
regression baseline (:mod:`.tfidf_baseline`). Nothing is imported here.

Depends on: nothing in peftflow beyond errors.
"""
