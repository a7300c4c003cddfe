"""The SynPO trainer, one job per module: ``loop`` (:class:`~synpo.train.loop.Trainer`), ``engine``
(devices, process group, DeepSpeed), ``schedule`` (LR schedule, run length), ``reference_cache``,
``checkpointing``, ``evaluation`` and ``metrics``. Import from the modules (``synpo.Trainer`` and
``synpo.trainer`` re-export the public names); importing this package imports nothing else."""
