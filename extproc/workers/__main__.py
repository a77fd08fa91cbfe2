import sys

from extproc.workers.worker import main

sys.exit(main())
