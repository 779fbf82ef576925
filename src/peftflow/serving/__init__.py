"""Serving trained models: the MLflow pyfunc flavour (:mod:`.pyfunc`, loaded from code by
:mod:`.pyfunc_entry`) and batch prediction over files (:mod:`.predict`). Nothing is
imported here.

Depends on: data, models, tracking, task.
"""
