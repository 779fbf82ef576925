"""The two task kinds behind one interface, and what runs through it.

:mod:`.base` is the interface (:class:`~peftflow.task.base.TaskKind`);
:mod:`.classification` and :mod:`.generation` (with :mod:`.generation_loss` and
:mod:`.generation_decoding`) implement it; :mod:`.registry` picks one for a config
(the only read of ``cfg.task``). :mod:`.run` is the training run every task shares,
:mod:`.preflight` the checks before any work, :mod:`.memory` the memory estimate of a
config. Nothing is imported here.

Depends on: config, data, checks, models, training, evaluation, tracking.
"""
