"""heteroserve.conformance: the suite every platform plugin must pass (a pytest plugin).

Run it with ``pytest --pyargs heteroserve.conformance --platform NAME [--report DIR]`` or
``heteroserve conformance --platform NAME`` (see :mod:`heteroserve.conformance.runner`).
"""
