"""``python -m jaxckpt``: the ``jaxckpt`` command line (see ``jaxckpt.cli``)."""

from jaxckpt.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
