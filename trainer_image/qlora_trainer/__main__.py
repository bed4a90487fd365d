import sys

from qlora_trainer.cli import main

sys.exit(main())
