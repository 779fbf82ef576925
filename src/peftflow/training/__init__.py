"""Training: the loop (:mod:`.loop`) with its objective (:mod:`.objective`), batches
(:mod:`.batching`), precision (:mod:`.precision`), non-finite guard (:mod:`.finite_guard`),
resumable checkpoints (:mod:`.checkpoint`) and data-parallel replicas (:mod:`.replicas`);
memory: the measured peak (:mod:`.memory`), the estimate (:mod:`.estimate`) and the C
allocator (:mod:`.allocator`). Nothing is imported here.

Depends on: config, models.
"""
