"""Sources record cluster state into a Store; they never touch the datapath."""
