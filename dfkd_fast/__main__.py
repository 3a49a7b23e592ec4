import sys

from dfkd_fast.cli import main

sys.exit(main())
