"""``python -m peftflow.cli``: the same as the ``peftflow`` command.

Depends on: nothing in peftflow beyond cli.main.
"""

from peftflow.cli.main import entry

entry()
