"""Fine-tuning methods: the registry (:mod:`.registry`) and the implementations it binds.

:mod:`.selective` freezes and unfreezes existing parameters, :mod:`.peft_based` builds
peft's own configs (the LoRA family, IA3, VeRA, LN tuning, QLoRA, prompt learning),
:mod:`.adapters` inserts bottleneck adapters (peft has none). Each method's settings
are declared in :mod:`peftflow.config.methods`.

Depends on: config.
"""
