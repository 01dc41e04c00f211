"""xenguest: saves and restores a domain's memory as a libxc migration stream."""
