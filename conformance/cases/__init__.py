"""Shape grids of the conformance suite, one module per op family. Each ``*_cases(ctx)``
returns the cases for the platform under test (``ctx.quick`` selects the smaller grid);
dtypes and page sizes the platform does not declare are kept and skipped with a reason."""
