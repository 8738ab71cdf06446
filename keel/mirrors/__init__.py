"""Keel's fast re-implementations of its dependencies' internals, all in this one package.

Each module reproduces what a pinned dependency computes (Feast's offline retrieval and online
stores, Evidently's drift statistics), faster, and must keep giving the same answer. Its
docstring ends with the lines the test suite reads::

    Mirrors: <package>==<version> (<what of the dependency it follows>)
    Parity test: <file in tests/>::<test name>

``tests/test_architecture.py`` checks that the version is the one pinned in requirements.lock
and installed, and that each parity test exists: upgrading the dependency means running those
tests again and then updating the line.
"""
