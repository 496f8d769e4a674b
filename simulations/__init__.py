"""Many Starmesh nodes on one machine: in-process on virtual time, and real processes."""
