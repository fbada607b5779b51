"""``taps-fast train`` and ``taps-fast eval``: TAPS on pretrained timm models and ImageFolder data
(cli.py: the arguments; loop.py: the run; data.py: folders, transforms, sampling; state.py:
checkpoints; model.py: the methods; evaluate.py: ``taps-fast eval``). docs/training.md explains."""
