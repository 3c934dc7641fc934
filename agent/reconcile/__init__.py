"""Turn DesiredState into datapath writes: the reconciler and its runner."""
