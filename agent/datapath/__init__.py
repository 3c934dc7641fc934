"""Datapath backends: the only package that talks to the kernel.

Every backend implements `agent.datapath.interface.Datapath`. Only modules
under this package import bcc, pyroute2 or nftables bindings.
"""
