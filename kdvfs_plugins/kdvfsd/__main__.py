"""``python -m kdvfs_plugins.kdvfsd``: the same as the ``kdvfsd`` console script."""
import sys

from .server import main

sys.exit(main())
