import sys
from srmig.cli import main

sys.exit(main())
