import sys

from megatron_dpsl.upcycle.cli import main

sys.exit(main())
