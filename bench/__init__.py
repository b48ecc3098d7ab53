"""fetchpool's benchmark against the alternatives people write by hand: ``python -m bench`` (make bench),
``python -m bench --smoke`` (make bench-smoke, part of make test). See bench/cli.py."""
