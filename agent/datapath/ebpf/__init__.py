"""The eBPF datapath: BCC-compiled programs, pinned maps, and their writer."""
