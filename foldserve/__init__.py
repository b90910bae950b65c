"""The ``foldserve`` command (:mod:`foldserve.cli`): a dispatcher over the two halves.

A package of its own, beside ``service`` and ``training``: every install carries it (the
serving image too), and it imports neither half until a command asks for one.
"""
