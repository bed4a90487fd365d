import sys

from qlora_trainer.cli import entrypoint

sys.exit(entrypoint())
