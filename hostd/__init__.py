"""whimbrel-hostd: everything local to one host (QEMU processes, QMP, leases, networking)."""
