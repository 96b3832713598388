import sys

from quietgpt.cli import main

sys.exit(main())
