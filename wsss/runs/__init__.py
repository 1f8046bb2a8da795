"""Run bookkeeping, one mechanism per concern, for every command that writes.

* :mod:`wsss.runs.lock` — the lock files (created whole with ``os.link``; stale ones on this host
  taken over, other hosts never guessed about): an output folder, a slide of ``predict-wsi``, the
  merge of a cohort's tables.
* :mod:`wsss.runs.owner` — an output folder held for a run (:func:`~wsss.runs.owner.owned_folder`):
  its lock and its manifest (``.wsss-manifest.jsonl``: what wsss wrote there, with which settings
  and inputs), and the rule that nothing wsss did not write is replaced without ``--force``.
* :mod:`wsss.runs.journal` — a run's progress (:class:`~wsss.runs.journal.Journal`: the steps of
  ``reproduce``, the window rows of a ``predict-wsi`` slide) and :func:`~wsss.runs.journal.diff_settings`,
  the one way a command says which settings differ from an earlier run's.

Resuming follows one policy: a command continues what an earlier run of the *same* settings left
(training with ``--resume``, ``reproduce`` and ``generate-pm`` by themselves, ``predict-wsi`` from
its last saved row) and, when the settings differ, says which in one line and stops unless
``--force`` (``predict-wsi``'s own scratch rows are simply started over).
"""
