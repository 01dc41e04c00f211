"""The emulated hypervisor (the role of libxenctrl): hosts, domains, memory, dirty logs."""
import os

# No BLAS thread pool: numpy's linear algebra is never used here, and starting one costs every
# process 50-100 ms of CPU (set before numpy first loads, inherited by every child).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from .domain import Domain, DomainError
from .host import Host, ROOT_ENV, check_name, default_root
from .memory import PAGE_SHIFT, PAGE_SIZE, GuestMemory

__all__ = ["Domain", "DomainError", "GuestMemory", "Host", "PAGE_SHIFT", "PAGE_SIZE", "ROOT_ENV",
           "check_name", "default_root"]
