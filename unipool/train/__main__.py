import sys

from unipool.train.loop import main

sys.exit(main())
