"""The typed model of the Kubernetes objects veer consumes."""
