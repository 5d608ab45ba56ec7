"""A test model package for ``SGLANG_EXTERNAL_MODEL_PACKAGE`` (tests/test_server_faults.py)."""
