"""Python imports this module at start-up in every process of the test cluster (tests/test_ray.py puts this
folder on the cluster's PYTHONPATH): it registers the test-only ``wait_for_file`` controller in Ray's workers."""
import wait_controller  # noqa: F401
