import sys

from nanomarkov.cli import main

sys.exit(main())
