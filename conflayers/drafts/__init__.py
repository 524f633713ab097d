"""Drafts: what proposes the tokens the full model verifies. Enter by ``seam`` (the two-method
drafter interface, the one file the engine core imports), then ``auto`` (which picks among the
others each step).

- ``seam``: ``Drafter`` (``propose(ctx) -> Proposal``, ``observe(outcome)``), ``DraftContext``,
  ``Proposal``, ``StepOutcome`` and ``NoDrafter`` (an empty proposal is plain decoding).
- ``layerskip``: ``LayerSkipDrafter``, the model itself with a skip set, under a policy
  (``FixedSkip``, or a searcher of ``conflayers/search/``).
- ``ngram``: ``NgramDrafter``, batched prompt lookup in each row's own prompt and output.
- ``corpus``: ``SuffixIndex`` over a dataset's finished outputs and ``CorpusDrafter`` that copies
  from it.
- ``router``: ``GroupRouter``, rows of several groups (datasets) in one batch, each group's
  drafter in turn.
- ``auto``: ``AutoDrafter``, the controller that runs whichever of the above the cost surface
  predicts commits the most tokens/s, and ``build_drafter`` (every drafter by name).
"""
