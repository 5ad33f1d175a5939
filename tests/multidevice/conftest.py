"""Tests that need several devices: 8 CPU devices (--xla_force_host_platform_device_count).

XLA reads the device count once, when JAX starts, and every other test assumes one CPU device,
so these run in a fresh process: tests/test_tensor_parallel.py starts pytest on this directory
with QOQ_MULTIDEVICE=1. Collected in any other run, they are ignored.
"""

import os

if os.environ.get("QOQ_MULTIDEVICE") != "1":
    collect_ignore_glob = ["test_*.py"]
else:
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()
