"""``python -m search.cli``: what each worker of ``search --workers K`` runs."""

import sys

from search.cli.main import main

sys.exit(main())
