"""Tools for tests and benchmarks, outside the runtime packages: the OOD picture-set generator
(`ood_set`, `python -m tools.build_ood_set`) and the Serve replica killer (`replicas`).

Nothing in `dermanet/` imports them (tests/test_layers.py checks).
"""
