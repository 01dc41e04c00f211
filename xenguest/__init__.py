"""xenguest: saves and restores a domain's memory as a libxc migration stream."""
import os

# No BLAS thread pool: numpy's linear algebra is never used here, and starting one costs every
# process 50-100 ms of CPU (set before numpy first loads, inherited by every child).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

