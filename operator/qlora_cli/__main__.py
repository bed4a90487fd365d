import sys

from qlora_cli.main import main

sys.exit(main())
