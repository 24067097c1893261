"""``python -m loadcast`` is the ``loadcast`` command."""

from loadcast.cli import main

main()
