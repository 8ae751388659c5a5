"""Pipeline parallelism's layout: which global layers each pipeline stage holds (``stages``)."""
