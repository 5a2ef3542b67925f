"""Helpers shared by the tests (and the benchmarks): servers, corpus builders, reference vectors,
protocol stand-ins. No test module imports another test module; they import from here."""
