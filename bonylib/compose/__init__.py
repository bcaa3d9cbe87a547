"""Layer 4, composition: what puts the stages together for a user.

The stages (``ssl``, ``evaluation``, ``attention``) never import each other; where a run needs two of them
(pretraining with a k-NN monitor, a chapter that trains and then evaluates), the glue lives here:

- :mod:`bonylib.compose.pretrain`: ``bony pretrain``'s config (training + the k-NN monitor), the trainer with
  its monitor, and the comparison of finished runs;
- :mod:`bonylib.compose.curation`: ``bony curate``, clusters of a ``bony embed`` store as a manifest column that
  pretraining balances over, and their figure;
- :mod:`bonylib.compose.notebook`: the set-up every chapter runs first.
"""
