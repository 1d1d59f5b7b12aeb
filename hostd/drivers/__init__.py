"""Resource drivers: storage leases and networking, behind small interfaces."""
