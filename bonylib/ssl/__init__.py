"""Self-supervised pretraining, a stage (layer 3): it imports neither ``evaluation`` nor ``attention``.

The run's options (``config``), multi-crop views and histology augmentations (``augment``), iBOT's block masks
(``masking``), images, batches and the epoch's order, shuffled or balanced over a manifest column (``data``), the
objectives (``losses/``: one module per objective behind one interface: DINO, iBOT, KoLeo, KDE, and the two
centerings, EMA and Sinkhorn-Knopp), the student, EMA teacher and objectives of one step (``model``), schedules, EMA, distributed set-up,
verified checkpoints (``checkpoints``), the loop with resume and pre-emption (``trainer``), a run's log as tables
(``runs``) and the toy DINO of the theory chapter (``collapse``). The k-NN monitor arrives as a callback
(:class:`bonylib.ssl.trainer.Monitor`) from :mod:`bonylib.compose.pretrain`.
"""
