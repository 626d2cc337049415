"""``python -m edgeft ...``: what launchers run (``torchrun --nproc_per_node 2 -m edgeft train ...``)."""

from .cli import main

main()
