"""dpmock's own tests, by area; ``python3 test_dpmock.py`` (``make test``) runs them all. Not in the wheel."""
