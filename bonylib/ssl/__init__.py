"""Self-supervised pretraining, a stage (layer 3): it imports neither ``evaluation`` nor ``attention``.

The run's options (``config``), multi-crop views and histology augmentations (``augment``), images and batches
(``data``), the objectives (``losses/``: one module per objective behind one interface, DINO's with its
centering), the student, EMA teacher and objectives of one step (``model``), schedules, EMA, distributed set-up,
verified checkpoints (``checkpoints``), the loop with resume and pre-emption (``trainer``), a run's log as tables
(``runs``) and the toy DINO of the theory chapter (``collapse``). The k-NN monitor arrives as a callback
(:class:`bonylib.ssl.trainer.Monitor`) from :mod:`bonylib.compose.pretrain`.
"""
