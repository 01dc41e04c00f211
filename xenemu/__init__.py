"""The emulated hypervisor (the role of libxenctrl): hosts, domains, memory, dirty logs."""
from .domain import Domain, DomainError
from .host import Host, ROOT_ENV, check_name, default_root
from .memory import PAGE_SHIFT, PAGE_SIZE, GuestMemory

__all__ = ["Domain", "DomainError", "GuestMemory", "Host", "PAGE_SHIFT", "PAGE_SIZE", "ROOT_ENV",
           "check_name", "default_root"]
