"""How ranks are started and fed requests: the local executor (one process, ``torchrun`` or ``--nproc``) and
the Ray executor, both around one :class:`~dvg_dist.executors.worker.Worker` (docs/parallel.md)."""
